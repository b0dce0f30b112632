//! The broker's edge, the only place that knows prost, tonic and axum: `grpc/` serves the
//! RocketMQ `MessagingService` and ferrumq's `AdminService`, `http/` the produce endpoint,
//! health and metrics, and [`serve`] runs both on their listeners until told to stop.

pub mod grpc;
pub mod http;

use std::net::SocketAddr;
use std::sync::Arc;

use ferrumq_nameserver::NameServer;
use ferrumq_protocol::admin::admin_service_server::AdminServiceServer;
use ferrumq_protocol::cluster::cluster_service_server::ClusterServiceServer;
use ferrumq_protocol::v2::messaging_service_server::MessagingServiceServer;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::service::Broker;

/// Largest gRPC message accepted: a full batch of maximum-size bodies fits.
const MAX_GRPC_MESSAGE: usize = 130 << 20;

/// Serves gRPC on `grpc_listener` (with the embedded nameserver's `ClusterService` when one is
/// given) and HTTP on `http_listener` until `stop` fires; returns the two servers' tasks.
pub(crate) fn serve(
    broker: Arc<Broker>,
    grpc_listener: TcpListener,
    http_listener: TcpListener,
    nameserver: Option<NameServer>,
    stop: oneshot::Receiver<()>,
) -> Vec<JoinHandle<()>> {
    let (http_stop_tx, http_stop_rx) = oneshot::channel::<()>();
    let mut router = tonic::transport::Server::builder()
        .max_frame_size(Some(256 * 1024))
        .add_service(
            MessagingServiceServer::new(grpc::messaging::MessagingApi::new(broker.clone()))
                .max_decoding_message_size(MAX_GRPC_MESSAGE)
                .max_encoding_message_size(MAX_GRPC_MESSAGE),
        )
        .add_service(AdminServiceServer::new(grpc::admin::AdminApi::new(
            broker.clone(),
        )));
    if let Some(nameserver) = nameserver {
        router = router.add_service(ClusterServiceServer::new(nameserver));
    }
    let grpc_server = tokio::spawn(async move {
        // Without TCP_NODELAY a reply can sit 40 ms waiting for the client's delayed ACK.
        let incoming =
            tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
        let shutdown = async {
            let _ = stop.await;
            let _ = http_stop_tx.send(());
        };
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!(error = %e, "gRPC server failed");
        }
    });
    let http_router = http::router(broker);
    let http_server = tokio::spawn(async move {
        let serve = axum::serve(
            http_listener,
            http_router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async {
            let _ = http_stop_rx.await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "HTTP server failed");
        }
    });
    vec![grpc_server, http_server]
}
