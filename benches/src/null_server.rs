//! `null-server`: a MessagingService that answers SendMessage with OK and stores nothing.
//! Run against it, `produce` shows what gRPC, the client and this machine allow on their
//! own: the ceiling to read the broker's figures against.

use std::net::SocketAddr;

use clap::Args;
use ferrumq_protocol::v2::messaging_service_server::{MessagingService, MessagingServiceServer};
use ferrumq_protocol::v2::{
    Address, AddressScheme, Broker, Endpoints, HeartbeatRequest, HeartbeatResponse, MessageQueue,
    MessageType, Permission, QueryRouteRequest, QueryRouteResponse, SendMessageResponse,
    SendResultEntry, Status, TelemetryCommand,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response};

#[derive(Args, Debug)]
pub(crate) struct NullServerArgs {
    #[arg(long, default_value = "127.0.0.1:8091")]
    listen: SocketAddr,
}

/// Answers just enough for the official client to start: a route of one queue pointing at
/// this server, heartbeats, and a Telemetry stream that stays open.
struct NullService {
    listen: SocketAddr,
}

#[tonic::async_trait]
impl MessagingService for NullService {
    async fn query_route(
        &self,
        request: Request<QueryRouteRequest>,
    ) -> Result<Response<QueryRouteResponse>, tonic::Status> {
        let queue = MessageQueue {
            topic: request.into_inner().topic,
            id: 0,
            permission: Permission::ReadWrite as i32,
            broker: Some(Broker {
                name: "null".into(),
                id: 0,
                endpoints: Some(Endpoints {
                    scheme: AddressScheme::IPv4 as i32,
                    addresses: vec![Address {
                        host: self.listen.ip().to_string(),
                        port: i32::from(self.listen.port()),
                    }],
                }),
            }),
            accept_message_types: vec![MessageType::Normal as i32],
        };
        Ok(Response::new(QueryRouteResponse {
            status: Some(Status::ok()),
            message_queues: vec![queue],
        }))
    }

    async fn heartbeat(
        &self,
        _request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, tonic::Status> {
        Ok(Response::new(HeartbeatResponse {
            status: Some(Status::ok()),
        }))
    }

    async fn telemetry(
        &self,
        _request: Request<tonic::Streaming<TelemetryCommand>>,
    ) -> Result<Response<BoxStream<TelemetryCommand>>, tonic::Status> {
        Ok(Response::new(Box::pin(tokio_stream::pending())))
    }

    async fn send_message(
        &self,
        request: Request<ferrumq_protocol::send::SendRequest>,
    ) -> Result<Response<SendMessageResponse>, tonic::Status> {
        let entries = request
            .into_inner()
            .messages
            .into_iter()
            .map(|m| SendResultEntry {
                status: Some(Status::ok()),
                message_id: m
                    .system_properties
                    .map(|s| s.message_id)
                    .unwrap_or_default(),
                transaction_id: String::new(),
                offset: 0,
                recall_handle: String::new(),
            })
            .collect();
        Ok(Response::new(SendMessageResponse {
            status: Some(Status::ok()),
            entries,
        }))
    }
}

pub(crate) fn run(args: &NullServerArgs) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tonic::transport::Server::builder()
                .add_service(MessagingServiceServer::new(NullService {
                    listen: args.listen,
                }))
                .serve_with_incoming(incoming)
                .await?;
            Ok(())
        })
}
