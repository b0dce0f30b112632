//! One function per command: build the request, call the admin service, show the answer.

use anyhow::{Context, anyhow, bail};
use ferrumq_protocol::admin::admin_service_client::AdminServiceClient;
use ferrumq_protocol::admin::{
    self, CreateGroupRequest, CreateTopicRequest, DeleteTopicRequest, DescribeGroupRequest,
    DescribeTopicRequest, GetClusterStatusRequest, ListDeadLettersRequest,
    ListDiscardedTransactionsRequest, ListGroupsRequest, ListTopicsRequest,
    PurgeDeadLettersRequest, QueryMessageRequest, ResendDeadLettersRequest, ResetOffsetRequest,
    group_delivery, query_message_request, reset_offset_request,
};
use ferrumq_protocol::v2::MessageType;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tonic::transport::Channel;

use crate::output::{Format, MessageOut, Table, emit, fields, time_text};
use crate::{GroupSettings, GroupUpdate, QueryBy, ResendWhich, ResetTarget, TopicSettings};

type Admin = AdminServiceClient<Channel>;

/// Where a new group starts in queues it has never read.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum Start {
    Earliest,
    Latest,
}

/// The broker's refusal, as it worded it.
fn refused(status: tonic::Status) -> anyhow::Error {
    match status.code() {
        tonic::Code::Unavailable => anyhow!("the broker is unavailable: {}", status.message()),
        _ => anyhow!("{}", status.message()),
    }
}

#[derive(Serialize)]
struct BrokerOut {
    cluster: String,
    broker: String,
    endpoint: String,
    version: String,
    flush: String,
    started_at: String,
    topics: u32,
    groups: u32,
    inflight_messages: u64,
    half_messages: u64,
    scheduled_messages_in_memory: u64,
    commit_log_written_bytes: u64,
    commit_log_durable_bytes: u64,
    storage: String,
}

#[derive(Serialize)]
struct MemberOut {
    cluster: String,
    broker: String,
    endpoint: String,
    last_seen_ms_ago: u64,
}

#[derive(Serialize)]
struct ClusterOut {
    broker: BrokerOut,
    members: Vec<MemberOut>,
}

pub(crate) async fn cluster_status(admin: &mut Admin, out: Format) -> anyhow::Result<()> {
    let reply = admin
        .get_cluster_status(GetClusterStatusRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    let b = reply.broker.unwrap_or_default();
    let value = ClusterOut {
        broker: BrokerOut {
            cluster: b.cluster_name,
            broker: b.broker_name,
            endpoint: b.endpoint,
            version: b.version,
            flush: b.flush,
            started_at: time_text(b.started_ms),
            topics: b.topics,
            groups: b.groups,
            inflight_messages: b.inflight_messages,
            half_messages: b.half_messages,
            scheduled_messages_in_memory: b.scheduled_messages_in_memory,
            commit_log_written_bytes: b.commit_log_written_bytes,
            commit_log_durable_bytes: b.commit_log_durable_bytes,
            storage: if b.storage_failure.is_empty() {
                "ok".to_owned()
            } else {
                format!("failed: {}", b.storage_failure)
            },
        },
        members: reply
            .members
            .into_iter()
            .map(|m| MemberOut {
                cluster: m.cluster_name,
                broker: m.broker_name,
                endpoint: m.endpoint,
                last_seen_ms_ago: m.last_seen_ms_ago,
            })
            .collect(),
    };
    emit(out, &value, |v| {
        let b = &v.broker;
        let mut text = fields(&[
            ("cluster", b.cluster.clone()),
            ("broker", b.broker.clone()),
            ("endpoint", b.endpoint.clone()),
            ("version", b.version.clone()),
            ("flush", b.flush.clone()),
            ("started", b.started_at.clone()),
            ("topics", b.topics.to_string()),
            ("groups", b.groups.to_string()),
            ("in flight", b.inflight_messages.to_string()),
            ("half messages", b.half_messages.to_string()),
            (
                "timers in memory",
                b.scheduled_messages_in_memory.to_string(),
            ),
            (
                "commit log",
                format!(
                    "{} bytes written, {} durable",
                    b.commit_log_written_bytes, b.commit_log_durable_bytes
                ),
            ),
            ("storage", b.storage.clone()),
        ]);
        if !v.members.is_empty() {
            let mut table = Table::new(&["CLUSTER", "BROKER", "ENDPOINT", "LAST SEEN"]);
            for m in &v.members {
                table.row(vec![
                    m.cluster.clone(),
                    m.broker.clone(),
                    m.endpoint.clone(),
                    format!("{} ms ago", m.last_seen_ms_ago),
                ]);
            }
            text.push_str("\n\n");
            text.push_str(&table.render());
        }
        text
    });
    Ok(())
}

#[derive(Serialize)]
struct TopicOut {
    name: String,
    queue_count: u32,
    message_types: Vec<String>,
}

fn topic_out(topic: admin::Topic) -> TopicOut {
    TopicOut {
        message_types: topic
            .accept_message_types
            .iter()
            .map(|t| {
                MessageType::try_from(*t)
                    .map_or_else(|_| t.to_string(), |t| t.as_str_name().to_owned())
            })
            .collect(),
        name: topic.name,
        queue_count: topic.queue_count,
    }
}

fn topics_table(topics: &[TopicOut]) -> String {
    let mut table = Table::new(&["TOPIC", "QUEUES", "MESSAGE TYPES"]);
    for t in topics {
        table.row(vec![
            t.name.clone(),
            t.queue_count.to_string(),
            t.message_types.join(","),
        ]);
    }
    table.render()
}

pub(crate) async fn put_topic(
    admin: &mut Admin,
    out: Format,
    settings: TopicSettings,
    update: bool,
) -> anyhow::Result<()> {
    let mut types = Vec::new();
    for name in settings.types.iter().flatten() {
        let t = MessageType::from_str_name(&name.trim().to_ascii_uppercase())
            .filter(|t| *t != MessageType::Unspecified)
            .ok_or_else(|| {
                anyhow!("--types: {name:?} is not one of NORMAL, FIFO, DELAY, TRANSACTION")
            })?;
        types.push(t as i32);
    }
    // 0 queues and no types ask the broker for its defaults.
    let mut queue_count = settings.queues.unwrap_or(0);
    if update {
        if settings.queues.is_none() && settings.types.is_none() {
            bail!("topic update: give --queues, --types or both");
        }
        // Updating a topic that does not exist would create it; say so instead. What the
        // update leaves out stays as it is.
        let current = describe(admin, &settings.name)
            .await?
            .topic
            .unwrap_or_default();
        if settings.queues.is_none() {
            queue_count = current.queue_count;
        }
        if settings.types.is_none() {
            types = current.accept_message_types;
        }
    }
    let reply = admin
        .create_topic(CreateTopicRequest {
            topic: Some(admin::Topic {
                name: settings.name,
                queue_count,
                accept_message_types: types,
            }),
            update_existing: update,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let topic = topic_out(reply.topic.unwrap_or_default());
    emit(out, &topic, |t| topics_table(std::slice::from_ref(t)));
    Ok(())
}

async fn describe(admin: &mut Admin, name: &str) -> anyhow::Result<admin::DescribeTopicResponse> {
    Ok(admin
        .describe_topic(DescribeTopicRequest {
            name: name.to_owned(),
        })
        .await
        .map_err(refused)?
        .into_inner())
}

pub(crate) async fn delete_topic(
    admin: &mut Admin,
    out: Format,
    name: String,
) -> anyhow::Result<()> {
    admin
        .delete_topic(DeleteTopicRequest { name: name.clone() })
        .await
        .map_err(refused)?;
    #[derive(Serialize)]
    struct Deleted {
        deleted: String,
    }
    emit(out, &Deleted { deleted: name }, |d| {
        format!("deleted topic {}", d.deleted)
    });
    Ok(())
}

pub(crate) async fn list_topics(
    admin: &mut Admin,
    out: Format,
    internal: bool,
) -> anyhow::Result<()> {
    let reply = admin
        .list_topics(ListTopicsRequest {
            include_internal: internal,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let topics: Vec<TopicOut> = reply.topics.into_iter().map(topic_out).collect();
    emit(out, &topics, |t| topics_table(t));
    Ok(())
}

#[derive(Serialize)]
struct QueueOut {
    queue_id: u32,
    min_offset: u64,
    max_offset: u64,
}

#[derive(Serialize)]
struct TopicDescription {
    topic: TopicOut,
    queues: Vec<QueueOut>,
}

pub(crate) async fn describe_topic(
    admin: &mut Admin,
    out: Format,
    name: String,
) -> anyhow::Result<()> {
    let reply = describe(admin, &name).await?;
    let value = TopicDescription {
        topic: topic_out(reply.topic.unwrap_or_default()),
        queues: reply
            .queues
            .into_iter()
            .map(|q| QueueOut {
                queue_id: q.queue_id,
                min_offset: q.min_offset,
                max_offset: q.max_offset,
            })
            .collect(),
    };
    emit(out, &value, |v| {
        let mut table = Table::new(&["QUEUE", "MIN OFFSET", "MAX OFFSET", "MESSAGES"]);
        for q in &v.queues {
            table.row(vec![
                q.queue_id.to_string(),
                q.min_offset.to_string(),
                q.max_offset.to_string(),
                (q.max_offset - q.min_offset.min(q.max_offset)).to_string(),
            ]);
        }
        format!(
            "{}\n\n{}",
            topics_table(std::slice::from_ref(&v.topic)),
            table.render()
        )
    });
    Ok(())
}

#[derive(Serialize)]
struct GroupOut {
    name: String,
    max_delivery_attempts: u32,
    start_position: String,
    fifo: bool,
    retry_backoff_ms: Vec<u64>,
}

fn group_out(group: admin::Group) -> GroupOut {
    GroupOut {
        start_position: admin::StartPosition::try_from(group.start_position)
            .map_or("LATEST", |p| match p {
                admin::StartPosition::Earliest => "EARLIEST",
                _ => "LATEST",
            })
            .to_owned(),
        name: group.name,
        max_delivery_attempts: group.max_delivery_attempts,
        fifo: group.fifo,
        retry_backoff_ms: group.retry_backoff_ms,
    }
}

fn groups_table(groups: &[GroupOut]) -> String {
    let mut table = Table::new(&["GROUP", "MAX ATTEMPTS", "STARTS AT", "FIFO"]);
    for g in groups {
        table.row(vec![
            g.name.clone(),
            g.max_delivery_attempts.to_string(),
            g.start_position.clone(),
            g.fifo.to_string(),
        ]);
    }
    table.render()
}

pub(crate) async fn create_group(
    admin: &mut Admin,
    out: Format,
    settings: GroupSettings,
) -> anyhow::Result<()> {
    let group = admin::Group {
        name: settings.name,
        max_delivery_attempts: settings.max_attempts,
        start_position: settings
            .from
            .map_or(admin::StartPosition::Unspecified, wire_start) as i32,
        retry_backoff_ms: settings.retry_backoff_ms,
        fifo: settings.fifo,
    };
    put_group(admin, out, group, false).await
}

fn wire_start(start: Start) -> admin::StartPosition {
    match start {
        Start::Earliest => admin::StartPosition::Earliest,
        Start::Latest => admin::StartPosition::Latest,
    }
}

/// Creates `group`, or with `update` replaces it; prints what the broker kept.
async fn put_group(
    admin: &mut Admin,
    out: Format,
    group: admin::Group,
    update: bool,
) -> anyhow::Result<()> {
    let reply = admin
        .create_group(CreateGroupRequest {
            group: Some(group),
            update_existing: update,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let group = group_out(reply.group.unwrap_or_default());
    emit(out, &group, |g| groups_table(std::slice::from_ref(g)));
    Ok(())
}

pub(crate) async fn update_group(
    admin: &mut Admin,
    out: Format,
    update: GroupUpdate,
) -> anyhow::Result<()> {
    let mut group = admin
        .describe_group(DescribeGroupRequest {
            group: update.name.clone(),
        })
        .await
        .map_err(refused)?
        .into_inner()
        .group
        .ok_or_else(|| {
            anyhow!(
                "the broker described group {:?} without its settings",
                update.name
            )
        })?;
    if let Some(attempts) = update.max_attempts {
        group.max_delivery_attempts = attempts;
    }
    if let Some(from) = update.from {
        group.start_position = wire_start(from) as i32;
    }
    if update.fifo || update.no_fifo {
        group.fifo = update.fifo;
    }
    if let Some(backoff) = update.retry_backoff_ms {
        group.retry_backoff_ms = backoff;
    }
    put_group(admin, out, group, true).await
}

pub(crate) async fn list_groups(admin: &mut Admin, out: Format) -> anyhow::Result<()> {
    let reply = admin
        .list_groups(ListGroupsRequest {})
        .await
        .map_err(refused)?
        .into_inner();
    let groups: Vec<GroupOut> = reply.groups.into_iter().map(group_out).collect();
    emit(out, &groups, |g| groups_table(g));
    Ok(())
}

#[derive(Serialize)]
struct ProgressOut {
    topic: String,
    queue_id: u32,
    acked_offset: u64,
    delivered_offset: u64,
    max_offset: u64,
    inflight: u64,
    lag: u64,
}

#[derive(Serialize)]
struct GroupDescription {
    group: GroupOut,
    queues: Vec<ProgressOut>,
}

pub(crate) async fn describe_group(
    admin: &mut Admin,
    out: Format,
    name: String,
) -> anyhow::Result<()> {
    let reply = admin
        .describe_group(DescribeGroupRequest { group: name })
        .await
        .map_err(refused)?
        .into_inner();
    let value = GroupDescription {
        group: group_out(reply.group.unwrap_or_default()),
        queues: reply
            .queues
            .into_iter()
            .map(|q| ProgressOut {
                topic: q.topic,
                queue_id: q.queue_id,
                acked_offset: q.acked_offset,
                delivered_offset: q.delivered_offset,
                max_offset: q.max_offset,
                inflight: q.inflight,
                lag: q.lag,
            })
            .collect(),
    };
    emit(out, &value, |v| {
        let mut table = Table::new(&[
            "TOPIC",
            "QUEUE",
            "ACKED",
            "DELIVERED",
            "MAX",
            "IN FLIGHT",
            "LAG",
        ]);
        for q in &v.queues {
            table.row(vec![
                q.topic.clone(),
                q.queue_id.to_string(),
                q.acked_offset.to_string(),
                q.delivered_offset.to_string(),
                q.max_offset.to_string(),
                q.inflight.to_string(),
                q.lag.to_string(),
            ]);
        }
        format!(
            "{}\n\n{}",
            groups_table(std::slice::from_ref(&v.group)),
            table.render()
        )
    });
    Ok(())
}

#[derive(Serialize)]
struct ResetOut {
    queue_id: u32,
    previous_offset: u64,
    offset: u64,
}

pub(crate) async fn reset_offset(
    admin: &mut Admin,
    out: Format,
    group: String,
    topic: String,
    target: ResetTarget,
    queues: Vec<u32>,
) -> anyhow::Result<()> {
    let to = match (target.to_time, target.to_offset) {
        (Some(ms), _) => reset_offset_request::To::TimestampMs(ms),
        (None, Some(offset)) => reset_offset_request::To::Offset(offset),
        (None, None) => return Err(anyhow!("give --to-time or --to-offset")),
    };
    let reply = admin
        .reset_offset(ResetOffsetRequest {
            group,
            topic,
            to: Some(to),
            queue_ids: queues,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let moves: Vec<ResetOut> = reply
        .queues
        .into_iter()
        .map(|q| ResetOut {
            queue_id: q.queue_id,
            previous_offset: q.previous_offset,
            offset: q.offset,
        })
        .collect();
    emit(out, &moves, |moves| {
        let mut table = Table::new(&["QUEUE", "FROM", "TO"]);
        for m in moves {
            table.row(vec![
                m.queue_id.to_string(),
                m.previous_offset.to_string(),
                m.offset.to_string(),
            ]);
        }
        table.render()
    });
    Ok(())
}

fn messages_table(messages: &[&MessageOut]) -> String {
    let mut table = Table::new(&[
        "MESSAGE ID",
        "TOPIC",
        "QUEUE",
        "OFFSET",
        "TAG",
        "STORED",
        "BODY",
    ]);
    for m in messages {
        table.row(vec![
            m.message_id.clone(),
            m.topic.clone(),
            m.queue_id.to_string(),
            m.queue_offset.to_string(),
            m.tag.clone().unwrap_or_default(),
            m.stored_at.clone(),
            m.body_preview.chars().take(40).collect(),
        ]);
    }
    table.render()
}

async fn query(
    admin: &mut Admin,
    topic: String,
    by: query_message_request::By,
    (from, to): (Option<i64>, Option<i64>),
    max: u32,
) -> anyhow::Result<Vec<admin::StoredMessage>> {
    Ok(admin
        .query_message(QueryMessageRequest {
            topic,
            by: Some(by),
            from_ms: from.unwrap_or(0),
            to_ms: to.unwrap_or(0),
            max,
        })
        .await
        .map_err(refused)?
        .into_inner()
        .messages)
}

pub(crate) async fn query_messages(
    admin: &mut Admin,
    out: Format,
    topic: String,
    by: QueryBy,
    range: (Option<i64>, Option<i64>),
    max: u32,
) -> anyhow::Result<()> {
    let by = match (by.id, by.key) {
        (Some(id), _) => query_message_request::By::MessageId(id),
        (None, Some(key)) => query_message_request::By::Key(key),
        (None, None) => return Err(anyhow!("give --id or --key")),
    };
    let found = query(admin, topic, by, range, max).await?;
    let messages: Vec<MessageOut> = found
        .iter()
        .filter_map(|m| m.message.as_ref().map(MessageOut::from_wire))
        .collect();
    emit(out, &messages, |m| {
        messages_table(&m.iter().collect::<Vec<_>>())
    });
    Ok(())
}

#[derive(Serialize)]
struct DeliveryOut {
    group: String,
    state: &'static str,
    attempt: u32,
    #[serde(skip_serializing_if = "String::is_empty")]
    visible_at: String,
}

#[derive(Serialize)]
struct ShownMessage {
    #[serde(flatten)]
    message: MessageOut,
    commit_log_position: u64,
    deliveries: Vec<DeliveryOut>,
}

pub(crate) async fn show_message(
    admin: &mut Admin,
    out: Format,
    id: String,
    topic: Option<String>,
) -> anyhow::Result<()> {
    let found = query(
        admin,
        topic.clone().unwrap_or_default(),
        query_message_request::By::MessageId(id.clone()),
        (None, None),
        16,
    )
    .await?;
    if found.is_empty() {
        return Err(match topic {
            Some(topic) => anyhow!("message {id} is not stored in topic {topic}"),
            None => anyhow!("message {id} is not stored on this broker"),
        });
    }
    let shown: Vec<ShownMessage> = found
        .into_iter()
        .filter_map(|stored| {
            let mut message = MessageOut::from_wire(stored.message.as_ref()?);
            message.queue_id = i32::try_from(stored.queue_id).unwrap_or(-1);
            message.queue_offset = i64::try_from(stored.queue_offset).unwrap_or(-1);
            Some(ShownMessage {
                message,
                commit_log_position: stored.commit_log_position,
                deliveries: stored
                    .deliveries
                    .into_iter()
                    .map(|d| DeliveryOut {
                        state: match group_delivery::State::try_from(d.state) {
                            Ok(group_delivery::State::Pending) => "pending",
                            Ok(group_delivery::State::InFlight) => "in flight",
                            Ok(group_delivery::State::Done) => "done",
                            Ok(group_delivery::State::DeadLettered) => "dead-lettered",
                            _ => "unknown",
                        },
                        group: d.group,
                        attempt: d.attempt,
                        visible_at: time_text(d.visible_at_ms),
                    })
                    .collect(),
            })
        })
        .collect();
    emit(out, &shown, |shown| {
        shown
            .iter()
            .map(|s| {
                let m = &s.message;
                let mut pairs = vec![
                    ("message id", m.message_id.clone()),
                    ("topic", m.topic.clone()),
                    ("queue", format!("{} offset {}", m.queue_id, m.queue_offset)),
                    ("tag", m.tag.clone().unwrap_or_default()),
                    ("keys", m.keys.join(", ")),
                    ("message group", m.message_group.clone().unwrap_or_default()),
                    ("born", m.born_at.clone()),
                    ("stored", m.stored_at.clone()),
                    ("deliver at", m.deliver_at.clone()),
                    ("position", s.commit_log_position.to_string()),
                ];
                for (key, value) in &m.properties {
                    pairs.push(("property", format!("{key}={value}")));
                }
                pairs.push(("body", format!("{} bytes", m.body_bytes)));
                let mut text = fields(&pairs);
                text.push('\n');
                text.push_str(&m.body_preview);
                let mut table = Table::new(&["GROUP", "STATE", "ATTEMPT", "VISIBLE AT"]);
                for d in &s.deliveries {
                    table.row(vec![
                        d.group.clone(),
                        d.state.to_owned(),
                        d.attempt.to_string(),
                        d.visible_at.clone(),
                    ]);
                }
                format!("{text}\n\n{}", table.render())
            })
            .collect::<Vec<_>>()
            .join("\n\n")
    });
    Ok(())
}

#[derive(Serialize)]
struct DeadLetterOut {
    #[serde(flatten)]
    message: MessageOut,
    origin_topic: String,
    dlq_offset: u64,
    dead_lettered_at: String,
}

#[derive(Serialize)]
struct DeadLetters {
    pending: u64,
    dead_letters: Vec<DeadLetterOut>,
}

async fn dead_letters(
    admin: &mut Admin,
    group: &str,
    max: u32,
) -> anyhow::Result<admin::ListDeadLettersResponse> {
    Ok(admin
        .list_dead_letters(ListDeadLettersRequest {
            group: group.to_owned(),
            max,
        })
        .await
        .map_err(refused)?
        .into_inner())
}

pub(crate) async fn list_dead_letters(
    admin: &mut Admin,
    out: Format,
    group: String,
    max: u32,
) -> anyhow::Result<()> {
    let reply = dead_letters(admin, &group, max).await?;
    let value = DeadLetters {
        pending: reply.pending,
        dead_letters: reply
            .dead_letters
            .into_iter()
            .filter_map(|d| {
                Some(DeadLetterOut {
                    message: MessageOut::from_wire(d.message.as_ref()?),
                    origin_topic: d.origin_topic,
                    dlq_offset: d.dlq_offset,
                    dead_lettered_at: time_text(d.dead_lettered_ms),
                })
            })
            .collect(),
    };
    emit(out, &value, |v| {
        let mut table = Table::new(&["MESSAGE ID", "FROM TOPIC", "DEAD-LETTERED", "TAG", "BODY"]);
        for d in &v.dead_letters {
            table.row(vec![
                d.message.message_id.clone(),
                d.origin_topic.clone(),
                d.dead_lettered_at.clone(),
                d.message.tag.clone().unwrap_or_default(),
                d.message.body_preview.chars().take(40).collect(),
            ]);
        }
        format!("{}\n\n{} dead letters waiting", table.render(), v.pending)
    });
    Ok(())
}

#[derive(Serialize)]
struct ResendOut {
    resent: u64,
    pending: u64,
    not_found: Vec<String>,
    /// Left waiting: the topic they came from no longer exists.
    orphaned: Vec<String>,
}

/// Dead letters resent per call: small enough to show progress, large enough to be quick.
const RESEND_CHUNK: u32 = 1000;

pub(crate) async fn resend_dead_letters(
    admin: &mut Admin,
    out: Format,
    group: String,
    which: ResendWhich,
) -> anyhow::Result<()> {
    let mut total = ResendOut {
        resent: 0,
        pending: 0,
        not_found: Vec::new(),
        orphaned: Vec::new(),
    };
    if which.all {
        let waiting = dead_letters(admin, &group, 1).await?.pending;
        let bar = ProgressBar::new(waiting).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} dead letters resent ({eta})")
                .context("progress bar template")?,
        );
        total.pending = waiting;
        // Only the dead letters stored when it started, oldest first: a message that is
        // dead-lettered again meanwhile waits for the next resend. The first reply says
        // where the dead-letter queue ended then.
        let mut before_offset = 0;
        loop {
            let reply = admin
                .resend_dead_letters(ResendDeadLettersRequest {
                    group: group.clone(),
                    message_ids: Vec::new(),
                    max: RESEND_CHUNK,
                    before_offset,
                })
                .await
                .map_err(refused)?
                .into_inner();
            total.resent += u64::from(reply.resent);
            total.pending = reply.pending;
            for id in reply.orphaned {
                if !total.orphaned.contains(&id) {
                    total.orphaned.push(id);
                }
            }
            bar.inc(u64::from(reply.resent));
            if before_offset == 0 {
                // An empty dead-letter queue ends at 0: nothing to bound, nothing resent.
                before_offset = reply.end_offset;
            }
            if reply.resent == 0 {
                break;
            }
        }
        bar.finish_and_clear();
    } else {
        let reply = admin
            .resend_dead_letters(ResendDeadLettersRequest {
                group: group.clone(),
                message_ids: which.ids,
                max: 0,
                before_offset: 0,
            })
            .await
            .map_err(refused)?
            .into_inner();
        total = ResendOut {
            resent: u64::from(reply.resent),
            pending: reply.pending,
            not_found: reply.not_found,
            orphaned: reply.orphaned,
        };
    }
    emit(out, &total, |t| {
        let mut text = format!(
            "resent {} dead letters of {group}; {} still waiting",
            t.resent, t.pending
        );
        if !t.not_found.is_empty() {
            text.push_str(&format!(
                "\nnot waiting dead letters of {group}: {}",
                t.not_found.join(", ")
            ));
        }
        if !t.orphaned.is_empty() {
            text.push_str(&format!(
                "\nleft waiting, their topic is gone: {}",
                t.orphaned.join(", ")
            ));
        }
        text
    });
    if !total.not_found.is_empty() {
        return Err(anyhow!(
            "{} of the ids are not waiting dead letters of group {group}",
            total.not_found.len()
        ));
    }
    if !total.orphaned.is_empty() {
        return Err(anyhow!(
            "{} dead letters of group {group} were left waiting: the topics they came from no longer exist; create them again, or purge",
            total.orphaned.len()
        ));
    }
    Ok(())
}

pub(crate) async fn purge_dead_letters(
    admin: &mut Admin,
    out: Format,
    group: String,
    yes: bool,
) -> anyhow::Result<()> {
    if !yes {
        let waiting = dead_letters(admin, &group, 1).await?.pending;
        return Err(anyhow!(
            "this drops {waiting} dead letters of group {group} for good; add --yes to confirm"
        ));
    }
    let purged = admin
        .purge_dead_letters(PurgeDeadLettersRequest {
            group: group.clone(),
        })
        .await
        .map_err(refused)?
        .into_inner()
        .purged;
    #[derive(Serialize)]
    struct Purged {
        purged: u64,
    }
    emit(out, &Purged { purged }, |p| {
        format!("purged {} dead letters of {group}", p.purged)
    });
    Ok(())
}

#[derive(Serialize)]
struct DiscardedOut {
    transaction_id: String,
    checks: u32,
    discarded_at: String,
    #[serde(flatten)]
    message: MessageOut,
}

pub(crate) async fn list_discarded(
    admin: &mut Admin,
    out: Format,
    topic: Option<String>,
    max: u32,
) -> anyhow::Result<()> {
    let reply = admin
        .list_discarded_transactions(ListDiscardedTransactionsRequest {
            topic: topic.unwrap_or_default(),
            max,
        })
        .await
        .map_err(refused)?
        .into_inner();
    let discarded: Vec<DiscardedOut> = reply
        .transactions
        .into_iter()
        .filter_map(|t| {
            Some(DiscardedOut {
                message: MessageOut::from_wire(t.message.as_ref()?),
                transaction_id: t.transaction_id,
                checks: t.checks,
                discarded_at: time_text(t.discarded_ms),
            })
        })
        .collect();
    emit(out, &discarded, |d| {
        let mut table = Table::new(&[
            "TRANSACTION ID",
            "TOPIC",
            "MESSAGE ID",
            "CHECKS",
            "DISCARDED",
        ]);
        for t in d {
            table.row(vec![
                t.transaction_id.clone(),
                t.message.topic.clone(),
                t.message.message_id.clone(),
                t.checks.to_string(),
                t.discarded_at.clone(),
            ]);
        }
        table.render()
    });
    Ok(())
}
