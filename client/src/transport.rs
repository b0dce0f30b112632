//! Connections, request headers, routes and which brokers to avoid for a while.
//!
//! One HTTP/2 channel per endpoint carries every request to it (tonic reconnects it when it
//! breaks). Routes come from whichever access point answers first and are cached per topic;
//! a broker that could not be reached is put last for `down_for`, so requests fail over to
//! the others while it is away.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferrumq_protocol::consumed::messaging_service_client::MessagingServiceClient;
use ferrumq_protocol::v2;
use ferrumq_protocol::v2::{
    Address, AddressScheme, Endpoints, MessageQueue, Permission, QueryRouteRequest, Resource,
};
use tonic::client::GrpcService;
use tonic::codegen::http;
use tonic::transport::Channel;

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::framed::{BufferPool, EncodedRequest};

pub(crate) type Rpc = MessagingServiceClient<Channel>;

/// A unary reply, which carries a status.
pub(crate) trait Reply {
    fn status(&self) -> Option<&v2::Status>;
}

macro_rules! replies {
    ($($reply:ty),*) => {
        $(impl Reply for $reply {
            fn status(&self) -> Option<&v2::Status> {
                self.status.as_ref()
            }
        })*
    };
}

replies!(
    v2::QueryRouteResponse,
    v2::SendMessageResponse,
    ferrumq_protocol::consumed::AckReply,
    v2::ChangeInvisibleDurationResponse,
    v2::EndTransactionResponse,
    v2::RecallMessageResponse,
    v2::QueryOffsetResponse
);

/// A topic's queues and the brokers that hold them.
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) queues: Vec<MessageQueue>,
    fetched: Instant,
}

impl Route {
    /// The distinct brokers with a queue that allows `permission` (READ or WRITE).
    pub(crate) fn brokers(&self, write: bool) -> Vec<String> {
        let mut brokers: Vec<String> = Vec::new();
        for queue in &self.queues {
            let allowed = match Permission::try_from(queue.permission) {
                Ok(Permission::ReadWrite) => true,
                Ok(Permission::Write) => write,
                Ok(Permission::Read) => !write,
                _ => false,
            };
            if let Some(endpoint) = allowed.then(|| queue_endpoint(queue)).flatten()
                && !brokers.contains(&endpoint)
            {
                brokers.push(endpoint);
            }
        }
        brokers
    }
}

/// The `host:port` a queue's broker serves on.
pub(crate) fn queue_endpoint(queue: &MessageQueue) -> Option<String> {
    let address = queue
        .broker
        .as_ref()?
        .endpoints
        .as_ref()?
        .addresses
        .first()?;
    Some(format!("{}:{}", address.host, address.port))
}

pub(crate) fn resource(name: &str) -> Option<Resource> {
    Some(Resource {
        resource_namespace: String::new(),
        name: name.to_owned(),
    })
}

/// `host:port` as protobuf endpoints.
pub(crate) fn endpoints(endpoint: &str) -> Option<Endpoints> {
    let (host, port) = endpoint.rsplit_once(':')?;
    Some(Endpoints {
        scheme: if host.parse::<std::net::IpAddr>().is_ok() {
            AddressScheme::IPv4 as i32
        } else {
            AddressScheme::DomainName as i32
        },
        addresses: vec![Address {
            host: host.to_owned(),
            port: port.parse().ok()?,
        }],
    })
}

#[derive(Debug)]
pub(crate) struct Transport {
    pub(crate) config: ClientConfig,
    channels: Mutex<HashMap<String, Channel>>,
    routes: Mutex<HashMap<String, Arc<Route>>>,
    down_until: Mutex<HashMap<String, Instant>>,
    next: AtomicUsize,
    /// Buffers that send requests are encoded into.
    pub(crate) buffers: BufferPool,
}

impl Transport {
    pub(crate) fn new(config: ClientConfig) -> Result<Arc<Transport>> {
        config.validate()?;
        Ok(Arc::new(Transport {
            config,
            channels: Mutex::new(HashMap::new()),
            routes: Mutex::new(HashMap::new()),
            down_until: Mutex::new(HashMap::new()),
            next: AtomicUsize::new(0),
            buffers: BufferPool::default(),
        }))
    }

    /// The channel to `endpoint`; the connection is made on first use.
    fn channel(&self, endpoint: &str) -> Result<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let channel = Channel::from_shared(format!("http://{endpoint}"))
            .map_err(|e| Error::Config(format!("endpoint {endpoint:?}: {e}")))?
            .connect_timeout(self.config.request_timeout)
            .tcp_nodelay(true)
            .max_frame_size(256 * 1024)
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_while_idle(true)
            .connect_lazy();
        channels.insert(endpoint.to_owned(), channel.clone());
        Ok(channel)
    }

    /// The client for `endpoint`; the connection is made on first use.
    pub(crate) fn rpc(&self, endpoint: &str) -> Result<Rpc> {
        Ok(MessagingServiceClient::new(self.channel(endpoint)?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// Calls `method` of the messaging service with an encoded request, like `unary` does
    /// any other request, handing its frame to the connection as it is (see
    /// [`framed`](crate::framed)).
    pub(crate) async fn call_encoded<R>(
        &self,
        endpoint: &str,
        method: &'static str,
        encoded: EncodedRequest,
    ) -> Result<R>
    where
        R: Reply + prost::Message + Default + Send + 'static,
    {
        let timeout = self.timeout();
        let mut channel = self.channel(endpoint)?;
        let reply = within(endpoint, timeout, async {
            let rpc_error = |s: tonic::Status| Error::from_rpc(endpoint, timeout, &s);
            let unreachable =
                |e: tonic::transport::Error| rpc_error(tonic::Status::from_error(e.into()));
            std::future::poll_fn(|cx| GrpcService::poll_ready(&mut channel, cx))
                .await
                .map_err(unreachable)?;
            let (metadata, _, ()) = self.request((), Some(timeout)).into_parts();
            let mut request = http::Request::new(encoded.into_body());
            *request.method_mut() = http::Method::POST;
            *request.uri_mut() = http::Uri::from_static(method);
            *request.version_mut() = http::Version::HTTP_2;
            *request.headers_mut() = metadata.into_headers();
            let headers = request.headers_mut();
            headers.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            let response = GrpcService::call(&mut channel, request)
                .await
                .map_err(unreachable)?;
            crate::framed::unary_reply::<R>(response)
                .await
                .map_err(rpc_error)
        })
        .await?;
        Error::check(endpoint, reply.status())?;
        Ok(reply)
    }

    /// A request with the client id header, and a deadline unless `timeout` is `None`
    /// (streams that live as long as the client).
    pub(crate) fn request<T>(&self, body: T, timeout: Option<Duration>) -> tonic::Request<T> {
        let mut request = tonic::Request::new(body);
        if let Ok(id) = self.config.client_id.parse() {
            request.metadata_mut().insert("x-mq-client-id", id);
        }
        request.metadata_mut().insert(
            "x-mq-language",
            tonic::metadata::MetadataValue::from_static("RUST"),
        );
        request.metadata_mut().insert(
            "x-mq-protocol",
            tonic::metadata::MetadataValue::from_static("v2"),
        );
        if let Some(timeout) = timeout {
            request.set_timeout(timeout);
        }
        request
    }

    pub(crate) fn timeout(&self) -> Duration {
        self.config.request_timeout
    }

    /// One unary call to `endpoint` within the request timeout: `call` makes it on the
    /// endpoint's client; a failed call or a reply whose status is not OK is an [`Error`].
    pub(crate) async fn unary<B, R, F, Fut>(&self, endpoint: &str, body: B, call: F) -> Result<R>
    where
        F: FnOnce(Rpc, tonic::Request<B>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<R>, tonic::Status>>,
        R: Reply,
    {
        let timeout = self.timeout();
        let rpc = self.rpc(endpoint)?;
        let reply = within(endpoint, timeout, async {
            call(rpc, self.request(body, Some(timeout)))
                .await
                .map_err(|s| Error::from_rpc(endpoint, timeout, &s))
        })
        .await?
        .into_inner();
        Error::check(endpoint, reply.status())?;
        Ok(reply)
    }

    /// The cached route of `topic`, asked for again when older than the refresh interval.
    pub(crate) async fn route(&self, topic: &str) -> Result<Arc<Route>> {
        let cached = self
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(topic)
            .cloned();
        match cached {
            Some(route) if route.fetched.elapsed() < self.config.route_refresh => Ok(route),
            Some(route) => Ok(self.refresh_route(topic).await.unwrap_or(route)),
            None => self.refresh_route(topic).await,
        }
    }

    /// Asks the access points in turn (those not marked down first) for `topic`'s route.
    pub(crate) async fn refresh_route(&self, topic: &str) -> Result<Arc<Route>> {
        let mut last = None;
        for point in self.in_preference_order(self.config.access_points.clone(), None) {
            match self.query_route(&point, topic).await {
                Ok(queues) => {
                    let route = Arc::new(Route {
                        queues,
                        fetched: Instant::now(),
                    });
                    self.routes
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(topic.to_owned(), route.clone());
                    return Ok(route);
                }
                // Only an unknown topic is the answer; a broker that cannot say now (say, it
                // lost its nameserver) leaves the other access points to ask.
                Err(e) if e.code() == Some(v2::Code::TopicNotFound) => {
                    return Err(no_route(topic, e));
                }
                Err(e @ Error::Broker { .. }) => last = Some(e),
                Err(e) => {
                    self.mark_down(&point);
                    last = Some(e);
                }
            }
        }
        Err(match last {
            Some(e) => no_route(topic, e),
            None => Error::Config("no access point".into()),
        })
    }

    async fn query_route(&self, point: &str, topic: &str) -> Result<Vec<MessageQueue>> {
        let request = QueryRouteRequest {
            topic: resource(topic),
            endpoints: endpoints(point),
        };
        let reply = self
            .unary(point, request, |mut rpc, r| async move {
                rpc.query_route(r).await
            })
            .await?;
        if reply.message_queues.is_empty() {
            return Err(Error::NoRoute {
                topic: topic.to_owned(),
                reason: format!("{point} knows no queue for it"),
            });
        }
        Ok(reply.message_queues)
    }

    /// Whether `endpoint` is an access point or a broker in a route this client has looked up.
    pub(crate) fn knows(&self, endpoint: &str) -> bool {
        if self.config.access_points.iter().any(|a| a == endpoint) {
            return true;
        }
        let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
        routes.values().any(|route| {
            route
                .queues
                .iter()
                .any(|q| queue_endpoint(q).as_deref() == Some(endpoint))
        })
    }

    /// Puts `endpoint` last for a while after it failed.
    pub(crate) fn mark_down(&self, endpoint: &str) {
        tracing::debug!(endpoint, "endpoint unreachable; trying others first");
        self.down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                endpoint.to_owned(),
                down_until(Instant::now(), self.config.down_for),
            );
    }

    /// `endpoints` rotated to start at `start` (a FIFO message group's broker, kept first
    /// even when down) or else by a shared counter (spreading load), with those marked down
    /// moved to the end.
    pub(crate) fn in_preference_order(
        &self,
        mut endpoints: Vec<String>,
        start: Option<usize>,
    ) -> Vec<String> {
        if endpoints.len() > 1 {
            let turn = match start {
                Some(start) => {
                    endpoints.sort();
                    start
                }
                None => self.next.fetch_add(1, Ordering::Relaxed),
            };
            let len = endpoints.len();
            endpoints.rotate_left(turn % len);
        }
        if start.is_some() {
            // A FIFO group stays on its broker even while it is down: moving it to another
            // would let its later messages overtake the earlier ones still there.
            return endpoints;
        }
        let down = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        endpoints.sort_by_key(|e| down.get(e).is_some_and(|until| *until > now));
        endpoints
    }
}

fn no_route(topic: &str, cause: Error) -> Error {
    match cause {
        Error::NoRoute { .. } => cause,
        Error::Broker { .. } if cause.code() == Some(ferrumq_protocol::v2::Code::TopicNotFound) => {
            cause
        }
        other => Error::NoRoute {
            topic: topic.to_owned(),
            reason: other.to_string(),
        },
    }
}

/// When an endpoint that failed at `now` is tried first again; a `down_for` past what the
/// clock can hold means a year.
fn down_until(now: Instant, down_for: Duration) -> Instant {
    now.checked_add(down_for)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// Runs `call` against `endpoint`, giving up after `timeout`. The `grpc-timeout` header only
/// asks the server to stop in time; a reply lost on the way (a stalled network, a broker that
/// hangs) would otherwise be waited for until the connection is declared dead.
pub(crate) async fn within<T>(
    endpoint: &str,
    timeout: Duration,
    call: impl Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(Error::Timeout {
                endpoint: endpoint.to_owned(),
                timeout,
            })
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(host: &str, permission: Permission) -> MessageQueue {
        MessageQueue {
            permission: permission as i32,
            broker: Some(ferrumq_protocol::v2::Broker {
                name: host.into(),
                id: 0,
                endpoints: endpoints(host),
            }),
            ..MessageQueue::default()
        }
    }

    #[test]
    fn brokers_are_listed_once_by_permission() {
        let route = Route {
            queues: vec![
                queue("10.0.0.1:8081", Permission::ReadWrite),
                queue("10.0.0.1:8081", Permission::ReadWrite),
                queue("10.0.0.2:8081", Permission::Read),
                queue("broker-c:8081", Permission::Write),
            ],
            fetched: Instant::now(),
        };
        assert_eq!(route.brokers(true), ["10.0.0.1:8081", "broker-c:8081"]);
        assert_eq!(route.brokers(false), ["10.0.0.1:8081", "10.0.0.2:8081"]);
    }

    #[test]
    fn any_down_time_is_a_time_not_a_panic() {
        let now = Instant::now();
        assert_eq!(
            down_until(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert!(down_until(now, Duration::MAX) > now);
    }

    #[test]
    fn known_endpoints_are_access_points_and_brokers_of_looked_up_routes() {
        let transport = Transport::new(ClientConfig::new("a:1")).unwrap();
        assert!(transport.knows("a:1") && !transport.knows("10.0.0.2:8081"));
        transport.routes.lock().unwrap().insert(
            "t".into(),
            Arc::new(Route {
                queues: vec![queue("10.0.0.2:8081", Permission::ReadWrite)],
                fetched: Instant::now(),
            }),
        );
        assert!(transport.knows("10.0.0.2:8081"));
        transport.routes.lock().unwrap().clear();
        assert!(!transport.knows("10.0.0.2:8081"));
    }

    #[test]
    fn endpoints_marked_down_go_last() {
        let transport = Transport::new(ClientConfig::new("a:1")).unwrap();
        transport.mark_down("b:1");
        for _ in 0..3 {
            let order =
                transport.in_preference_order(vec!["c:1".into(), "b:1".into(), "a:1".into()], None);
            assert_eq!(order.last().map(String::as_str), Some("b:1"));
        }
        let sticky = |start| {
            transport
                .in_preference_order(vec!["c:1".into(), "a:1".into(), "b:1".into()], Some(start))
        };
        assert_eq!(sticky(0), ["a:1", "b:1", "c:1"]);
        assert_eq!(sticky(4), ["b:1", "c:1", "a:1"]);
    }
}
