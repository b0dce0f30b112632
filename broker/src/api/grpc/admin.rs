//! `ferrumq.admin.v1.AdminService`: topics, groups, group progress and message queries.
//! Errors are gRPC statuses whose message names the field.

use std::sync::Arc;

use ferrumq_protocol::admin::admin_service_server::AdminService;
use ferrumq_protocol::admin::{
    BrokerStatus, ClusterMember, CreateGroupRequest, CreateGroupResponse, CreateTopicRequest,
    CreateTopicResponse, DeadLetter, DeleteTopicRequest, DeleteTopicResponse, DescribeGroupRequest,
    DescribeGroupResponse, DescribeTopicRequest, DescribeTopicResponse, DiscardedTransaction,
    GetClusterStatusRequest, GetClusterStatusResponse, Group, GroupDelivery,
    ListDeadLettersRequest, ListDeadLettersResponse, ListDiscardedTransactionsRequest,
    ListDiscardedTransactionsResponse, ListGroupsRequest, ListGroupsResponse, ListTopicsRequest,
    ListTopicsResponse, PurgeDeadLettersRequest, PurgeDeadLettersResponse, QueryMessageRequest,
    QueryMessageResponse, QueueProgress, QueueRange, QueueReset, ResendDeadLettersRequest,
    ResendDeadLettersResponse, ResetOffsetRequest, ResetOffsetResponse, StartPosition as WireStart,
    StoredMessage, Topic, group_delivery, query_message_request, reset_offset_request,
};
use ferrumq_protocol::v2::{self, Code, MessageType};
use ferrumq_storage::StoredRecord;
use tonic::{Request, Response};

use crate::admin::ResetTo;
use crate::config::FlushPolicy;
use crate::error::ApiError;
use crate::message::{self, BodyDigest, property};
use crate::metadata::{self, GroupConfig, StartPosition, TopicConfig};
use crate::service::{Broker, now_ms};

pub struct AdminApi {
    broker: Arc<Broker>,
}

impl AdminApi {
    pub fn new(broker: Arc<Broker>) -> AdminApi {
        AdminApi { broker }
    }

    /// A query narrowed to a topic names one that exists; an empty name means any topic.
    fn known_topic(&self, topic: &str) -> Result<(), tonic::Status> {
        if topic.is_empty() {
            return Ok(());
        }
        self.broker.readable_topic(topic).map(drop).map_err(to_grpc)
    }

    /// A stored record as the message a query shows.
    fn shown(&self, record: &StoredRecord) -> Result<Option<v2::Message>, tonic::Status> {
        message::to_wire(record, None, &self.broker.endpoint, BodyDigest::Md5)
            .map(Some)
            .map_err(to_grpc)
    }
}

type Reply<T> = Result<Response<T>, tonic::Status>;

fn to_grpc(e: ApiError) -> tonic::Status {
    match e.code {
        Code::TopicNotFound | Code::ConsumerGroupNotFound | Code::NotFound => {
            tonic::Status::not_found(e.message)
        }
        Code::Unsupported | Code::NotImplemented => tonic::Status::unimplemented(e.message),
        Code::InternalServerError | Code::InternalError => tonic::Status::internal(e.message),
        _ => tonic::Status::invalid_argument(e.message),
    }
}

fn sorted(names: &[String]) -> Vec<&str> {
    let mut names: Vec<&str> = names.iter().map(String::as_str).collect();
    names.sort_unstable();
    names
}

fn wire_topic(t: &TopicConfig) -> Topic {
    Topic {
        name: t.name.clone(),
        queue_count: t.queue_count,
        accept_message_types: t.message_types().into_iter().map(|m| m as i32).collect(),
    }
}

fn wire_group(g: &GroupConfig) -> Group {
    Group {
        name: g.name.clone(),
        max_delivery_attempts: g.max_delivery_attempts,
        start_position: match g.start_position {
            StartPosition::Earliest => WireStart::Earliest as i32,
            StartPosition::Latest => WireStart::Latest as i32,
        },
        retry_backoff_ms: g.retry_backoff_ms.clone(),
        fifo: g.fifo,
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn create_topic(
        &self,
        request: Request<CreateTopicRequest>,
    ) -> Reply<CreateTopicResponse> {
        let request = request.into_inner();
        let topic = request
            .topic
            .ok_or_else(|| tonic::Status::invalid_argument("topic is missing"))?;
        let config = &self.broker.config;
        let mut types = Vec::new();
        for t in &topic.accept_message_types {
            let t = MessageType::try_from(*t).map_err(|_| {
                tonic::Status::invalid_argument(format!(
                    "topic.accept_message_types: {t} is not a message type"
                ))
            })?;
            types.push(t.as_str_name().to_owned());
        }
        if types.is_empty() {
            types.push(MessageType::Normal.as_str_name().to_owned());
        }
        let wanted = TopicConfig {
            name: topic.name.clone(),
            queue_count: if topic.queue_count == 0 {
                config.topics.default_queue_count
            } else {
                topic.queue_count
            },
            accept_message_types: types,
        };
        if metadata::is_system_topic(&wanted.name) {
            return Err(tonic::Status::invalid_argument(format!(
                "topic.name {:?} is reserved",
                wanted.name
            )));
        }
        let created = self
            .broker
            .metadata
            .put_topic(wanted.clone(), request.update_existing)
            .map_err(to_grpc)?;
        // Without `update_existing` an existing topic is kept as it is, and what comes back
        // is what was there. That is fine as long as what the request names (a queue count
        // other than 0, message types) matches it; otherwise it would be silently ignored.
        let queues_differ = topic.queue_count != 0 && created.queue_count != wanted.queue_count;
        let types_differ = !topic.accept_message_types.is_empty()
            && sorted(&created.accept_message_types) != sorted(&wanted.accept_message_types);
        if queues_differ || types_differ {
            return Err(tonic::Status::already_exists(format!(
                "topic {:?} exists with {} queues accepting {}; update it instead",
                wanted.name,
                created.queue_count,
                created.accept_message_types.join(", ")
            )));
        }
        self.broker.publish_routes();
        Ok(Response::new(CreateTopicResponse {
            topic: Some(wire_topic(&created)),
        }))
    }

    async fn delete_topic(
        &self,
        request: Request<DeleteTopicRequest>,
    ) -> Reply<DeleteTopicResponse> {
        self.broker
            .metadata
            .delete_topic(&request.into_inner().name)
            .map_err(to_grpc)?;
        self.broker.publish_routes();
        Ok(Response::new(DeleteTopicResponse {}))
    }

    async fn list_topics(&self, request: Request<ListTopicsRequest>) -> Reply<ListTopicsResponse> {
        let internal = request.into_inner().include_internal;
        let topics = self
            .broker
            .metadata
            .topics()
            .iter()
            .filter(|t| internal || !metadata::is_system_topic(&t.name))
            .map(wire_topic)
            .collect();
        Ok(Response::new(ListTopicsResponse { topics }))
    }

    async fn create_group(
        &self,
        request: Request<CreateGroupRequest>,
    ) -> Reply<CreateGroupResponse> {
        let request = request.into_inner();
        let group = request
            .group
            .ok_or_else(|| tonic::Status::invalid_argument("group is missing"))?;
        let mut config = self.broker.metadata.default_group(&group.name, now_ms());
        if group.max_delivery_attempts != 0 {
            config.max_delivery_attempts = group.max_delivery_attempts;
        }
        if !group.retry_backoff_ms.is_empty() {
            config.retry_backoff_ms.clone_from(&group.retry_backoff_ms);
        }
        config.start_position = match WireStart::try_from(group.start_position) {
            Ok(WireStart::Earliest) => StartPosition::Earliest,
            Ok(WireStart::Latest | WireStart::Unspecified) => StartPosition::Latest,
            Err(_) => {
                return Err(tonic::Status::invalid_argument(
                    "group.start_position is not a known position",
                ));
            }
        };
        config.fifo = group.fifo;
        let created = self
            .broker
            .metadata
            .put_group(config.clone(), request.update_existing)
            .map_err(to_grpc)?;
        // As with topics: a group that was there is a conflict when it differs in what the
        // request names.
        let differs = (group.max_delivery_attempts != 0
            && created.max_delivery_attempts != config.max_delivery_attempts)
            || (!group.retry_backoff_ms.is_empty()
                && created.retry_backoff_ms != config.retry_backoff_ms)
            || (group.start_position != WireStart::Unspecified as i32
                && created.start_position != config.start_position)
            || (group.fifo && !created.fifo);
        if differs {
            return Err(tonic::Status::already_exists(format!(
                "group {:?} exists with other settings (max delivery attempts {}, start {:?}, fifo {}); update it instead",
                group.name, created.max_delivery_attempts, created.start_position, created.fifo
            )));
        }
        Ok(Response::new(CreateGroupResponse {
            group: Some(wire_group(&created)),
        }))
    }

    async fn list_groups(&self, _request: Request<ListGroupsRequest>) -> Reply<ListGroupsResponse> {
        let groups = self
            .broker
            .metadata
            .groups()
            .iter()
            .map(wire_group)
            .collect();
        Ok(Response::new(ListGroupsResponse { groups }))
    }

    async fn describe_group(
        &self,
        request: Request<DescribeGroupRequest>,
    ) -> Reply<DescribeGroupResponse> {
        let name = request.into_inner().group;
        let group =
            self.broker.metadata.group(&name).ok_or_else(|| {
                tonic::Status::not_found(format!("group {name:?} does not exist"))
            })?;
        let queues = self
            .broker
            .consumers
            .progress(&name)
            .into_iter()
            .map(|(topic, queue_id, acked, delivered, inflight)| {
                let max = self
                    .broker
                    .store
                    .consume_queue(&topic, queue_id)
                    .map_or(0, |q| q.max_offset().0);
                QueueProgress {
                    lag: max.saturating_sub(acked),
                    topic,
                    queue_id,
                    acked_offset: acked,
                    delivered_offset: delivered,
                    max_offset: max,
                    inflight,
                }
            })
            .collect();
        Ok(Response::new(DescribeGroupResponse {
            group: Some(wire_group(&group)),
            queues,
        }))
    }

    async fn query_message(
        &self,
        request: Request<QueryMessageRequest>,
    ) -> Reply<QueryMessageResponse> {
        let request = request.into_inner();
        self.known_topic(&request.topic)?;
        let to = if request.to_ms == 0 {
            i64::MAX
        } else {
            request.to_ms
        };
        let max = if request.max == 0 {
            32
        } else {
            request.max as usize
        };
        let records = match request.by {
            Some(query_message_request::By::MessageId(id)) => {
                self.broker.store.query_by_id(&id, request.from_ms, to)
            }
            Some(query_message_request::By::Key(key)) => {
                self.broker
                    .store
                    .query_by_key(&request.topic, &key, request.from_ms, to, max)
            }
            None => {
                return Err(tonic::Status::invalid_argument(
                    "one of message_id or key is required",
                ));
            }
        };
        let messages = records
            .iter()
            .filter(|r| request.topic.is_empty() || r.view().topic == request.topic)
            .take(max)
            .map(|r| {
                let view = r.view();
                Ok(StoredMessage {
                    message: self.shown(r)?,
                    commit_log_position: r.pos().0,
                    queue_id: view.queue_id,
                    queue_offset: view.queue_offset.0,
                    deliveries: self
                        .broker
                        .deliveries(&view)
                        .into_iter()
                        .map(|d| GroupDelivery {
                            group: d.group,
                            state: match (&d.lease, d.done) {
                                (_, true) if d.dead_lettered => group_delivery::State::DeadLettered,
                                (_, true) => group_delivery::State::Done,
                                (Some(_), false) => group_delivery::State::InFlight,
                                (None, false) => group_delivery::State::Pending,
                            } as i32,
                            attempt: d.lease.as_ref().map_or(0, |l| l.attempt),
                            visible_at_ms: d.lease.as_ref().map_or(0, |l| l.visible_at_ms),
                        })
                        .collect(),
                })
            })
            .collect::<Result<_, tonic::Status>>()?;
        Ok(Response::new(QueryMessageResponse { messages }))
    }

    async fn list_discarded_transactions(
        &self,
        request: Request<ListDiscardedTransactionsRequest>,
    ) -> Reply<ListDiscardedTransactionsResponse> {
        let request = request.into_inner();
        self.known_topic(&request.topic)?;
        let max = if request.max == 0 {
            100
        } else {
            request.max as usize
        };
        let transactions = self
            .broker
            .transactions
            .discarded(&request.topic, max)
            .into_iter()
            .map(|d| {
                Ok(DiscardedTransaction {
                    message: self.shown(&d.record)?,
                    transaction_id: d.transaction_id,
                    checks: d.checks,
                    discarded_ms: d.record.view().store_timestamp_ms,
                })
            })
            .collect::<Result<_, tonic::Status>>()?;
        Ok(Response::new(ListDiscardedTransactionsResponse {
            transactions,
        }))
    }

    async fn get_cluster_status(
        &self,
        _request: Request<GetClusterStatusRequest>,
    ) -> Reply<GetClusterStatusResponse> {
        let broker = &self.broker;
        let config = &broker.config;
        let log = broker.store.log();
        let status = BrokerStatus {
            cluster_name: config.cluster_name.clone(),
            broker_name: config.broker_name.clone(),
            endpoint: broker.endpoint.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            flush: match config.flush {
                FlushPolicy::Sync => "sync",
                FlushPolicy::Async => "async",
            }
            .to_owned(),
            commit_log_written_bytes: log.written_pos().0,
            commit_log_durable_bytes: log.durable_pos().0,
            topics: u32::try_from(
                broker
                    .metadata
                    .topics()
                    .iter()
                    .filter(|t| !metadata::is_system_topic(&t.name))
                    .count(),
            )
            .unwrap_or(u32::MAX),
            groups: u32::try_from(broker.metadata.groups().len()).unwrap_or(u32::MAX),
            inflight_messages: broker.consumers.inflight(),
            half_messages: broker.transactions.pending() as u64,
            scheduled_messages_in_memory: broker.timers.in_memory() as u64,
            storage_failure: log.failure().map(|f| f.to_string()).unwrap_or_default(),
            started_ms: broker.started_ms,
        };
        let members = match &broker.routes {
            crate::service::Routes::Embedded(table) => table
                .brokers()
                .into_iter()
                .map(|(registration, age)| ClusterMember {
                    cluster_name: registration.cluster,
                    broker_name: registration.broker_name,
                    endpoint: registration.endpoints.join(","),
                    last_seen_ms_ago: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
                })
                .collect(),
            crate::service::Routes::Nameservers(_) => Vec::new(),
        };
        Ok(Response::new(GetClusterStatusResponse {
            broker: Some(status),
            members,
        }))
    }

    async fn describe_topic(
        &self,
        request: Request<DescribeTopicRequest>,
    ) -> Reply<DescribeTopicResponse> {
        let name = request.into_inner().name;
        let topic = self.broker.readable_topic(&name).map_err(to_grpc)?;
        let queues = (0..topic.queue_count)
            .map(|queue_id| {
                let queue = self.broker.store.consume_queue(&topic.name, queue_id);
                QueueRange {
                    queue_id,
                    min_offset: queue.as_ref().map_or(0, |q| q.min_offset().0),
                    max_offset: queue.as_ref().map_or(0, |q| q.max_offset().0),
                }
            })
            .collect();
        Ok(Response::new(DescribeTopicResponse {
            topic: Some(wire_topic(&topic)),
            queues,
        }))
    }

    async fn reset_offset(
        &self,
        request: Request<ResetOffsetRequest>,
    ) -> Reply<ResetOffsetResponse> {
        let request = request.into_inner();
        let to = match request.to {
            Some(reset_offset_request::To::TimestampMs(ms)) => ResetTo::Time(ms),
            Some(reset_offset_request::To::Offset(offset)) => ResetTo::Offset(offset),
            None => {
                return Err(tonic::Status::invalid_argument(
                    "one of timestamp_ms or offset is required",
                ));
            }
        };
        let moves = self
            .broker
            .reset_offset(&request.group, &request.topic, to, &request.queue_ids)
            .await
            .map_err(to_grpc)?;
        Ok(Response::new(ResetOffsetResponse {
            queues: moves
                .into_iter()
                .map(|m| QueueReset {
                    queue_id: m.queue_id,
                    previous_offset: m.previous.unwrap_or(0),
                    offset: m.offset,
                })
                .collect(),
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<ListDeadLettersRequest>,
    ) -> Reply<ListDeadLettersResponse> {
        let request = request.into_inner();
        let max = if request.max == 0 {
            100
        } else {
            request.max as usize
        };
        let (letters, pending) = self
            .broker
            .dead_letters(&request.group, max)
            .map_err(to_grpc)?;
        let dead_letters = letters
            .iter()
            .map(|letter| {
                let view = letter.record.view();
                Ok(DeadLetter {
                    message: self.shown(&letter.record)?,
                    origin_topic: view
                        .properties
                        .get(property::DLQ_ORIGIN_TOPIC)
                        .unwrap_or_default()
                        .to_owned(),
                    dlq_offset: letter.dlq_offset,
                    dead_lettered_ms: view.store_timestamp_ms,
                })
            })
            .collect::<Result<_, tonic::Status>>()?;
        Ok(Response::new(ListDeadLettersResponse {
            dead_letters,
            pending,
        }))
    }

    async fn resend_dead_letters(
        &self,
        request: Request<ResendDeadLettersRequest>,
    ) -> Reply<ResendDeadLettersResponse> {
        let request = request.into_inner();
        let max = if request.max == 0 {
            1000
        } else {
            request.max as usize
        };
        let resent = self
            .broker
            .resend_dead_letters(
                &request.group,
                &request.message_ids,
                max,
                (request.before_offset != 0).then_some(request.before_offset),
            )
            .await
            .map_err(to_grpc)?;
        Ok(Response::new(ResendDeadLettersResponse {
            resent: u32::try_from(resent.resent).unwrap_or(u32::MAX),
            pending: resent.pending,
            not_found: resent.not_found,
            orphaned: resent.orphaned,
            end_offset: resent.end_offset,
        }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<PurgeDeadLettersRequest>,
    ) -> Reply<PurgeDeadLettersResponse> {
        let purged = self
            .broker
            .purge_dead_letters(&request.into_inner().group)
            .await
            .map_err(to_grpc)?;
        Ok(Response::new(PurgeDeadLettersResponse { purged }))
    }
}
