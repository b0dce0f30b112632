//! The nameserver's gRPC face: ferrumq's ClusterService for brokers, and the part of
//! MessagingService a client calls on its access point.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrumq_protocol::admin::admin_service_client::AdminServiceClient;
use ferrumq_protocol::admin::{CreateTopicRequest, Topic};
use ferrumq_protocol::cluster::cluster_service_server::ClusterService;
use ferrumq_protocol::cluster::{
    BrokerState, ListBrokersRequest, ListBrokersResponse, RegisterBrokerRequest,
    RegisterBrokerResponse, TopicRoute, UnregisterBrokerRequest, UnregisterBrokerResponse,
};
use ferrumq_protocol::v2::messaging_service_server::MessagingService;
use ferrumq_protocol::v2::{
    Code, HeartbeatRequest, HeartbeatResponse, NotifyClientTerminationRequest,
    NotifyClientTerminationResponse, QueryRouteRequest, QueryRouteResponse, Status,
    TelemetryCommand,
};
use tonic::{Request, Response};

use crate::route::RouteTable;
use ferrumq_protocol::session::{self, SettingsPolicy, TelemetryStream};

pub struct NameServer {
    routes: Arc<RouteTable>,
    heartbeat_interval: Duration,
    policy: SettingsPolicy,
}

impl NameServer {
    pub fn new(routes: Arc<RouteTable>, heartbeat_interval: Duration) -> NameServer {
        NameServer {
            routes,
            heartbeat_interval,
            policy: SettingsPolicy::default(),
        }
    }

    /// Drops silent brokers once per `period`, for as long as the table lives.
    pub fn spawn_expiry(routes: &Arc<RouteTable>, period: Duration) {
        let routes = Arc::downgrade(routes);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(routes) = routes.upgrade() else {
                    break;
                };
                routes.expire(Instant::now());
            }
        });
    }

    /// Serves ClusterService and MessagingService on `listener` until `shutdown` completes:
    /// brokers silent for `expiry` are dropped, and are told to heartbeat every `heartbeat`.
    pub async fn serve(
        listener: tokio::net::TcpListener,
        expiry: Duration,
        heartbeat: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        use ferrumq_protocol::cluster::cluster_service_server::ClusterServiceServer;
        use ferrumq_protocol::v2::messaging_service_server::MessagingServiceServer;
        let routes = Arc::new(RouteTable::new(expiry));
        NameServer::spawn_expiry(&routes, (expiry / 4).max(Duration::from_millis(10)));
        tonic::transport::Server::builder()
            .add_service(ClusterServiceServer::new(NameServer::new(
                routes.clone(),
                heartbeat,
            )))
            .add_service(MessagingServiceServer::new(NameServer::new(
                routes, heartbeat,
            )))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                shutdown,
            )
            .await
    }

    /// Asks each live broker that creates topics on demand to create `topic`, and adds the
    /// result to the routes until the broker's next registration lists it.
    async fn create_on_brokers(&self, topic: &str) -> bool {
        let mut created = false;
        for (registration, _) in self.routes.brokers() {
            if !registration.auto_create_topics || registration.broker_id != 0 {
                continue;
            }
            let Some(endpoint) = registration.endpoints.first() else {
                continue;
            };
            let Ok(mut admin) = AdminServiceClient::connect(format!("http://{endpoint}")).await
            else {
                continue;
            };
            let request = CreateTopicRequest {
                topic: Some(Topic {
                    name: topic.to_owned(),
                    queue_count: 0,
                    accept_message_types: Vec::new(),
                }),
                update_existing: false,
            };
            if let Ok(response) = admin.create_topic(request).await
                && let Some(t) = response.into_inner().topic
            {
                let mut updated = registration.clone();
                updated.topics.push(TopicRoute {
                    name: t.name,
                    queue_count: t.queue_count,
                    accept_message_types: t.accept_message_types,
                });
                self.routes.register(updated);
                created = true;
            }
        }
        created
    }
}

fn ok_or_status<T>(result: Result<T, Status>) -> (Status, Option<T>) {
    match result {
        Ok(v) => (Status::ok(), Some(v)),
        Err(status) => (status, None),
    }
}

#[tonic::async_trait]
impl ClusterService for NameServer {
    async fn register_broker(
        &self,
        request: Request<RegisterBrokerRequest>,
    ) -> Result<Response<RegisterBrokerResponse>, tonic::Status> {
        let registration = request
            .into_inner()
            .registration
            .ok_or_else(|| tonic::Status::invalid_argument("registration is missing"))?;
        if registration.broker_name.is_empty() || registration.endpoints.is_empty() {
            return Err(tonic::Status::invalid_argument(
                "registration.broker_name and registration.endpoints are required",
            ));
        }
        self.routes.register(registration);
        Ok(Response::new(RegisterBrokerResponse {
            heartbeat_interval_ms: u64::try_from(self.heartbeat_interval.as_millis())
                .unwrap_or(u64::MAX),
            expiry_ms: u64::try_from(self.routes.expiry().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn unregister_broker(
        &self,
        request: Request<UnregisterBrokerRequest>,
    ) -> Result<Response<UnregisterBrokerResponse>, tonic::Status> {
        let request = request.into_inner();
        self.routes
            .unregister(&request.broker_name, request.broker_id);
        Ok(Response::new(UnregisterBrokerResponse {}))
    }

    async fn list_brokers(
        &self,
        _request: Request<ListBrokersRequest>,
    ) -> Result<Response<ListBrokersResponse>, tonic::Status> {
        let brokers = self
            .routes
            .brokers()
            .into_iter()
            .map(|(registration, age)| BrokerState {
                registration: Some(registration),
                last_seen_ms_ago: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
            })
            .collect();
        Ok(Response::new(ListBrokersResponse { brokers }))
    }
}

#[tonic::async_trait]
impl MessagingService for NameServer {
    async fn query_route(
        &self,
        request: Request<QueryRouteRequest>,
    ) -> Result<Response<QueryRouteResponse>, tonic::Status> {
        let result = async {
            session::client_id(request.metadata())?;
            let topic = request
                .get_ref()
                .topic
                .as_ref()
                .map(|t| t.name.clone())
                .unwrap_or_default();
            if topic.is_empty() {
                return Err(Status::new(Code::IllegalTopic, "topic.name is empty"));
            }
            if let Some(queues) = self.routes.query(&topic) {
                return Ok(queues);
            }
            if self.create_on_brokers(&topic).await
                && let Some(queues) = self.routes.query(&topic)
            {
                return Ok(queues);
            }
            Err(Status::new(
                Code::TopicNotFound,
                format!("no live broker serves topic {topic:?}"),
            ))
        }
        .await;
        let (status, queues) = ok_or_status(result);
        Ok(Response::new(QueryRouteResponse {
            status: Some(status),
            message_queues: queues.unwrap_or_default(),
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, tonic::Status> {
        let status = session::client_id(request.metadata()).map_or_else(|s| s, |_| Status::ok());
        Ok(Response::new(HeartbeatResponse {
            status: Some(status),
        }))
    }

    async fn telemetry(
        &self,
        request: Request<tonic::Streaming<TelemetryCommand>>,
    ) -> Result<Response<TelemetryStream>, tonic::Status> {
        session::client_id(request.metadata())
            .map_err(|s| tonic::Status::invalid_argument(s.message))?;
        let policy = self.policy.clone();
        let (_sender, stream) = session::serve_telemetry(request.into_inner(), move |settings| {
            Ok(session::settings_reply(settings, &policy))
        });
        Ok(Response::new(stream))
    }

    async fn notify_client_termination(
        &self,
        _request: Request<NotifyClientTerminationRequest>,
    ) -> Result<Response<NotifyClientTerminationResponse>, tonic::Status> {
        Ok(Response::new(NotifyClientTerminationResponse {
            status: Some(Status::ok()),
        }))
    }
}
