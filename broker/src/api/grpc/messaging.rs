//! `apache.rocketmq.v2.MessagingService`. Business errors go in the response's `status`
//! (every unary response has one); only Telemetry uses gRPC errors.

use std::net::SocketAddr;
use std::sync::Arc;

use ferrumq_protocol::ack::{AckRequest, AckResponse, AckResponseEntry, EntryStatus};
use ferrumq_protocol::frame::{Frame, PullFrame, ReceiveFrame};
use ferrumq_protocol::send::SendRequest;
use ferrumq_protocol::session;
use ferrumq_protocol::v2::messaging_service_server::MessagingService;
use ferrumq_protocol::v2::{
    ChangeInvisibleDurationRequest, ChangeInvisibleDurationResponse, ClientType, Code,
    EndTransactionRequest, EndTransactionResponse, FilterType,
    ForwardMessageToDeadLetterQueueRequest, ForwardMessageToDeadLetterQueueResponse,
    GetOffsetRequest, GetOffsetResponse, HeartbeatRequest, HeartbeatResponse,
    NotifyClientTerminationRequest, NotifyClientTerminationResponse, PullMessageRequest,
    PullMessageResponse, QueryAssignmentRequest, QueryAssignmentResponse, QueryOffsetPolicy,
    QueryOffsetRequest, QueryOffsetResponse, QueryRouteRequest, QueryRouteResponse,
    RecallMessageRequest, RecallMessageResponse, ReceiveMessageRequest, ReceiveMessageResponse,
    Resource, SendMessageResponse, Status, TelemetryCommand, TransactionResolution,
    UpdateOffsetRequest, UpdateOffsetResponse, pull_message_response, receive_message_response,
    settings,
};
use tonic::codegen::BoxStream;
use tonic::{Request, Response};

use crate::error::{ApiError, ApiResult};
use crate::message::{self, BodyDigest, timestamp};
use crate::metadata;
use crate::service::{Broker, PullRequest, ReceiveRequest, now_ms};

pub struct MessagingApi {
    broker: Arc<Broker>,
}

impl MessagingApi {
    pub fn new(broker: Arc<Broker>) -> MessagingApi {
        MessagingApi { broker }
    }
}

type Reply<T> = Result<Response<T>, tonic::Status>;

fn name(resource: Option<&Resource>) -> &str {
    resource.map_or("", |r| r.name.as_str())
}

fn client_id<T>(request: &Request<T>) -> ApiResult<String> {
    session::client_id(request.metadata()).map_err(|s| {
        ApiError::new(
            Code::try_from(s.code).unwrap_or(Code::ClientIdRequired),
            s.message,
        )
    })
}

/// The digest form the calling client checks, by the language it names.
fn body_digest<T>(request: &Request<T>) -> BodyDigest {
    let language = request.metadata().get("x-mq-language");
    BodyDigest::for_language(language.and_then(|v| v.to_str().ok()))
}

fn status_of<T>(result: &ApiResult<T>) -> Status {
    match result {
        Ok(_) => Status::ok(),
        Err(e) => e.status(),
    }
}

fn peer<T>(request: &Request<T>) -> SocketAddr {
    request
        .remote_addr()
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn stream_of<T: Send + 'static>(items: Vec<T>) -> BoxStream<T> {
    Box::pin(tokio_stream::iter(items.into_iter().map(Ok)))
}

#[tonic::async_trait]
impl MessagingService for MessagingApi {
    async fn query_route(&self, request: Request<QueryRouteRequest>) -> Reply<QueryRouteResponse> {
        let result = async {
            let client = client_id(&request)?;
            self.broker
                .query_route(name(request.get_ref().topic.as_ref()), &client)
                .await
        }
        .await;
        Ok(Response::new(QueryRouteResponse {
            status: Some(status_of(&result)),
            message_queues: result.unwrap_or_default(),
        }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Reply<HeartbeatResponse> {
        let result = client_id(&request).and_then(|_| {
            let r = request.get_ref();
            if ClientType::try_from(r.client_type).is_err() {
                return Err(ApiError::new(
                    Code::UnrecognizedClientType,
                    format!("client_type {} is not a known ClientType", r.client_type),
                ));
            }
            // Producers name no group; a consumer's must be a valid group name.
            match r.group.as_ref().filter(|g| !g.name.is_empty()) {
                Some(group) => metadata::check_group_name(&group.name),
                None => Ok(()),
            }
        });
        Ok(Response::new(HeartbeatResponse {
            status: Some(status_of(&result)),
        }))
    }

    async fn send_message(&self, request: Request<SendRequest>) -> Reply<SendMessageResponse> {
        let peer = peer(&request);
        let result = match client_id(&request) {
            Ok(client) => {
                self.broker
                    .send(
                        request.into_inner().messages,
                        &message::grpc_field,
                        peer,
                        &client,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        let (status, entries) = match result {
            Ok(sent) => (Status::ok(), sent.into_iter().map(|s| s.result).collect()),
            Err(e) => (e.status(), Vec::new()),
        };
        Ok(Response::new(SendMessageResponse {
            status: Some(status),
            entries,
        }))
    }

    async fn query_assignment(
        &self,
        request: Request<QueryAssignmentRequest>,
    ) -> Reply<QueryAssignmentResponse> {
        let result = client_id(&request).and_then(|_| {
            let r = request.get_ref();
            self.broker
                .query_assignment(name(r.topic.as_ref()), name(r.group.as_ref()))
        });
        Ok(Response::new(QueryAssignmentResponse {
            status: Some(status_of(&result)),
            assignments: result
                .unwrap_or_default()
                .into_iter()
                .map(|q| ferrumq_protocol::v2::Assignment {
                    message_queue: Some(q),
                })
                .collect(),
        }))
    }

    async fn receive_message(
        &self,
        request: Request<ReceiveMessageRequest>,
    ) -> Reply<BoxStream<ReceiveFrame>> {
        use receive_message_response::Content;
        let deadline = super::deadline(request.metadata());
        let result = match client_id(&request) {
            Err(e) => Err(e),
            Ok(client) => {
                let r = request.get_ref();
                let filter = r.filter_expression.as_ref();
                self.broker
                    .receive(ReceiveRequest {
                        group: name(r.group.as_ref()),
                        topic: name(r.message_queue.as_ref().and_then(|q| q.topic.as_ref())),
                        filter_type: filter.map_or(FilterType::Tag as i32, |f| f.r#type),
                        filter_expression: filter.map_or("*", |f| f.expression.as_str()),
                        batch_size: r.batch_size,
                        invisible: r.invisible_duration.as_ref(),
                        auto_renew: r.auto_renew,
                        long_polling: r.long_polling_timeout.as_ref(),
                        deadline,
                        client_id: &client,
                        digest: body_digest(&request),
                    })
                    .await
            }
        };
        // The clients expect: a status, the messages, then a delivery timestamp.
        let reply = |content| {
            ReceiveFrame::response(ReceiveMessageResponse {
                content: Some(content),
            })
        };
        let mut frames = Vec::new();
        match result {
            Ok(messages) if messages.is_empty() => {
                frames.push(reply(Content::Status(Status::new(
                    Code::MessageNotFound,
                    "no new message",
                ))));
            }
            Ok(messages) => {
                frames.push(reply(Content::Status(Status::ok())));
                frames.extend(messages.into_iter().map(Frame::Message));
            }
            Err(e) => frames.push(reply(Content::Status(e.status()))),
        }
        frames.push(reply(Content::DeliveryTimestamp(timestamp(now_ms()))));
        Ok(Response::new(stream_of(frames)))
    }

    async fn ack_message(&self, request: Request<AckRequest>) -> Reply<AckResponse> {
        let result = match client_id(&request) {
            Err(e) => Err(e),
            Ok(_) => {
                let r = request.get_ref();
                if r.entries.is_empty() {
                    Err(ApiError::bad_request("entries is empty"))
                } else {
                    match r.handles() {
                        Ok(handles) => {
                            self.broker
                                .ack(name(r.group.as_ref()), name(r.topic.as_ref()), &handles)
                                .await
                        }
                        Err(e) if e.field == "receipt_handle" => {
                            Err(ApiError::new(Code::InvalidReceiptHandle, e.to_string()))
                        }
                        Err(e) => Err(ApiError::bad_request(e.to_string())),
                    }
                }
            }
        };
        // Each result entry gives back its request entry's message id and handle.
        let requested = request.into_inner().entries;
        let (status, entries) = match result {
            Ok(outcomes) => {
                let failed: Vec<&ApiError> =
                    outcomes.iter().filter_map(|o| o.as_ref().err()).collect();
                let status = match failed.len() {
                    0 => Status::ok(),
                    n if n == outcomes.len() => failed[0].status(),
                    _ => Status::new(
                        Code::MultipleResults,
                        "some entries failed; see each entry's status",
                    ),
                };
                let entries = requested
                    .into_iter()
                    .zip(&outcomes)
                    .map(|(entry, outcome)| {
                        let status = match outcome {
                            Ok(()) => EntryStatus::ok(),
                            Err(e) => e.status().into(),
                        };
                        AckResponseEntry::echo(entry, status)
                    })
                    .collect();
                (status, entries)
            }
            // The Rust client reads entries[0]: answer one entry per request entry even so.
            Err(e) => (
                e.status(),
                requested
                    .into_iter()
                    .map(|entry| AckResponseEntry::echo(entry, e.status().into()))
                    .collect(),
            ),
        };
        Ok(Response::new(AckResponse {
            status: Some(status),
            entries,
        }))
    }

    async fn forward_message_to_dead_letter_queue(
        &self,
        request: Request<ForwardMessageToDeadLetterQueueRequest>,
    ) -> Reply<ForwardMessageToDeadLetterQueueResponse> {
        let result = match client_id(&request) {
            Err(e) => Err(e),
            Ok(_) => {
                let r = request.get_ref();
                self.broker
                    .forward_to_dead_letter(
                        name(r.group.as_ref()),
                        name(r.topic.as_ref()),
                        &r.receipt_handle,
                    )
                    .await
            }
        };
        Ok(Response::new(ForwardMessageToDeadLetterQueueResponse {
            status: Some(status_of(&result)),
        }))
    }

    async fn pull_message(
        &self,
        request: Request<PullMessageRequest>,
    ) -> Reply<BoxStream<PullFrame>> {
        use pull_message_response::Content;
        let result = match client_id(&request) {
            Err(e) => Err(e),
            Ok(_) => {
                let r = request.get_ref();
                let queue = r.message_queue.as_ref();
                let filter = r
                    .filter_expression
                    .as_ref()
                    .map(|f| (f.r#type, f.expression.as_str()));
                self.broker
                    .pull(PullRequest {
                        topic: name(queue.and_then(|q| q.topic.as_ref())),
                        queue_id: queue.map_or(0, |q| q.id),
                        offset: r.offset,
                        batch_size: r.batch_size,
                        filter,
                        long_polling: r.long_polling_timeout.as_ref(),
                        digest: body_digest(&request),
                    })
                    .await
            }
        };
        let reply = |content| {
            PullFrame::response(PullMessageResponse {
                content: Some(content),
            })
        };
        let mut frames = Vec::new();
        match result {
            Ok((messages, next)) => {
                frames.push(reply(Content::Status(if messages.is_empty() {
                    Status::new(Code::MessageNotFound, "no new message")
                } else {
                    Status::ok()
                })));
                frames.extend(messages.into_iter().map(Frame::Message));
                frames.push(reply(Content::NextOffset(next)));
            }
            Err(e) => frames.push(reply(Content::Status(e.status()))),
        }
        Ok(Response::new(stream_of(frames)))
    }

    async fn update_offset(
        &self,
        request: Request<UpdateOffsetRequest>,
    ) -> Reply<UpdateOffsetResponse> {
        let result = match client_id(&request) {
            Err(e) => Err(e),
            Ok(_) => {
                let r = request.get_ref();
                let queue = r.message_queue.as_ref();
                self.broker
                    .update_offset(
                        name(r.group.as_ref()),
                        name(queue.and_then(|q| q.topic.as_ref())),
                        queue.map_or(0, |q| q.id),
                        r.offset,
                    )
                    .await
            }
        };
        Ok(Response::new(UpdateOffsetResponse {
            status: Some(status_of(&result)),
        }))
    }

    async fn get_offset(&self, request: Request<GetOffsetRequest>) -> Reply<GetOffsetResponse> {
        let result = client_id(&request).and_then(|_| {
            let r = request.get_ref();
            let queue = r.message_queue.as_ref();
            self.broker.get_offset(
                name(r.group.as_ref()),
                name(queue.and_then(|q| q.topic.as_ref())),
                queue.map_or(0, |q| q.id),
            )
        });
        Ok(Response::new(GetOffsetResponse {
            status: Some(status_of(&result)),
            offset: result.unwrap_or(-1),
        }))
    }

    async fn query_offset(
        &self,
        request: Request<QueryOffsetRequest>,
    ) -> Reply<QueryOffsetResponse> {
        let result = client_id(&request).and_then(|_| {
            let r = request.get_ref();
            let queue = r.message_queue.as_ref();
            let policy = QueryOffsetPolicy::try_from(r.query_offset_policy)
                .map_err(|_| ApiError::bad_request("query_offset_policy is not a known policy"))?;
            let at = r.timestamp.as_ref().map(|t| {
                t.seconds
                    .saturating_mul(1000)
                    .saturating_add(i64::from(t.nanos / 1_000_000))
            });
            self.broker.query_offset(
                name(queue.and_then(|q| q.topic.as_ref())),
                queue.map_or(0, |q| q.id),
                policy,
                at,
            )
        });
        Ok(Response::new(QueryOffsetResponse {
            status: Some(status_of(&result)),
            offset: result.unwrap_or(-1),
        }))
    }

    async fn end_transaction(
        &self,
        request: Request<EndTransactionRequest>,
    ) -> Reply<EndTransactionResponse> {
        let result = match client_id(&request) {
            Err(e) => Err(e),
            Ok(_) => {
                let r = request.get_ref();
                let resolution = TransactionResolution::try_from(r.resolution).map_err(|_| {
                    ApiError::bad_request(format!(
                        "resolution {} is not COMMIT (1), ROLLBACK (2) or UNSPECIFIED (0)",
                        r.resolution
                    ))
                });
                match resolution {
                    Err(e) => Err(e),
                    Ok(resolution) => {
                        self.broker
                            .end_transaction(
                                name(r.topic.as_ref()),
                                &r.message_id,
                                &r.transaction_id,
                                resolution,
                            )
                            .await
                    }
                }
            }
        };
        Ok(Response::new(EndTransactionResponse {
            status: Some(status_of(&result)),
        }))
    }

    async fn telemetry(
        &self,
        request: Request<tonic::Streaming<TelemetryCommand>>,
    ) -> Reply<BoxStream<TelemetryCommand>> {
        let client = session::client_id(request.metadata())
            .map_err(|s| tonic::Status::invalid_argument(s.message))?;
        let (broker, publisher) = (self.broker.clone(), client.clone());
        let (sender, stream) = session::serve_telemetry(request.into_inner(), move |settings| {
            let group = match &settings.pub_sub {
                Some(settings::PubSub::Subscription(s)) => s.group.as_ref().map(|g| g.name.clone()),
                Some(settings::PubSub::Publishing(p)) => {
                    let topics = p.topics.iter().map(|t| t.name.clone()).collect();
                    broker.declare_topics(&publisher, topics);
                    None
                }
                None => {
                    return Err(Status::new(
                        Code::UnrecognizedClientType,
                        "settings names neither publishing nor subscription",
                    ));
                }
            };
            let policy = broker
                .settings_policy(group.as_deref())
                .map_err(|e| e.status())?;
            Ok(session::settings_reply(settings, &policy))
        });
        self.broker.add_telemetry(client, sender);
        Ok(Response::new(stream))
    }

    async fn notify_client_termination(
        &self,
        request: Request<NotifyClientTerminationRequest>,
    ) -> Reply<NotifyClientTerminationResponse> {
        if let Ok(client) = client_id(&request)
            && let Err(error) = self.broker.client_left(&client).await
        {
            tracing::warn!(%client, error = %error.message, "releasing a leaving client's leases failed");
        }
        // Always OK: the Rust client's shutdown() fails on anything else.
        Ok(Response::new(NotifyClientTerminationResponse {
            status: Some(Status::ok()),
        }))
    }

    async fn change_invisible_duration(
        &self,
        request: Request<ChangeInvisibleDurationRequest>,
    ) -> Reply<ChangeInvisibleDurationResponse> {
        let result = match client_id(&request) {
            Err(e) => Err(e),
            Ok(_) => {
                let r = request.get_ref();
                self.broker
                    .change_invisible(
                        name(r.group.as_ref()),
                        name(r.topic.as_ref()),
                        &r.receipt_handle,
                        r.invisible_duration.as_ref(),
                    )
                    .await
            }
        };
        Ok(Response::new(ChangeInvisibleDurationResponse {
            status: Some(status_of(&result)),
            receipt_handle: result.unwrap_or_default(),
        }))
    }

    async fn recall_message(
        &self,
        request: Request<RecallMessageRequest>,
    ) -> Reply<RecallMessageResponse> {
        let result = match client_id(&request) {
            Err(e) => Err(e),
            Ok(_) => {
                let r = request.get_ref();
                self.broker
                    .recall(name(r.topic.as_ref()), &r.recall_handle)
                    .await
            }
        };
        Ok(Response::new(RecallMessageResponse {
            status: Some(status_of(&result)),
            message_id: result.unwrap_or_default(),
        }))
    }
}
