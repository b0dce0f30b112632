//! Topics and consumer groups. Every change is an op journaled in the commit log
//! (`%SYS%METADATA`, see [`op`]) and applied once it is committed, so no reader sees a change
//! a crash could take back. `metadata.json` is a snapshot: the state after the ops up to `applied_through`,
//! written after each change once those ops are durable. Opening reads the snapshot and
//! applies the ops the log holds after it.

mod op;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use ferrumq_protocol::v2::{Code, MessageType};
use ferrumq_storage::{LogPos, QueueOffset};
use serde::{Deserialize, Serialize};

pub use op::{MetadataOp, MetadataState};

use crate::config::BrokerConfig;
use crate::error::{ApiError, ApiResult, BrokerError};
use crate::log_writer::LogWriter;
use crate::message::system_record;

/// The internal topic topic and group changes are journaled in (queue 0).
pub const METADATA_TOPIC: &str = "%SYS%METADATA";
use crate::files;

/// Topics whose names start with these belong to the broker: clients may not send to them or
/// create them (dead-letter topics may still be read).
pub const RESERVED_TOPIC_PREFIXES: [&str; 4] = ["rmq_sys_", "%RETRY%", "%SYS%", "%DLQ%"];
pub const DLQ_PREFIX: &str = "%DLQ%";
const RESERVED_TOPIC_NAMES: [&str; 4] = [
    "TBW102",
    "SCHEDULE_TOPIC_XXXX",
    "RMQ_SYS_TRANS_HALF_TOPIC",
    "RMQ_SYS_TRACE_TOPIC",
];
pub const MAX_TOPIC_NAME: usize = 127;
pub const MAX_GROUP_NAME: usize = 255;
/// Back-offs a group may list (RocketMQ's delay levels are 18).
pub const MAX_RETRY_BACKOFFS: usize = 255;

/// The message types a topic may accept; a topic may accept several.
pub const SUPPORTED_MESSAGE_TYPES: [MessageType; 4] = [
    MessageType::Normal,
    MessageType::Fifo,
    MessageType::Delay,
    MessageType::Transaction,
];

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicConfig {
    pub name: String,
    pub queue_count: u32,
    /// Names of `apache.rocketmq.v2.MessageType` values (`NORMAL`, ...).
    pub accept_message_types: Vec<String>,
}

impl TopicConfig {
    pub fn accepts(&self, message_type: MessageType) -> bool {
        self.accept_message_types
            .iter()
            .any(|t| t == message_type.as_str_name())
    }

    pub fn message_types(&self) -> Vec<MessageType> {
        self.accept_message_types
            .iter()
            .filter_map(|t| MessageType::from_str_name(t))
            .collect()
    }

    pub fn is_dead_letter(&self) -> bool {
        self.name.starts_with(DLQ_PREFIX)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartPosition {
    /// Messages stored before the group was created are delivered too.
    Earliest,
    /// Only messages stored after the group was created.
    Latest,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupConfig {
    pub name: String,
    pub max_delivery_attempts: u32,
    pub start_position: StartPosition,
    pub retry_backoff_ms: Vec<u64>,
    pub fifo: bool,
    /// When the group was created (ms since the epoch): `Latest` starts each queue here.
    pub created_ms: i64,
}

impl GroupConfig {
    pub fn dead_letter_topic(&self) -> String {
        format!("{DLQ_PREFIX}{}", self.name)
    }
}

/// `metadata.json`: the state after the journaled ops up to `applied_through` (a queue
/// offset in [`METADATA_TOPIC`]; absent in files written before ops were journaled).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    #[serde(flatten)]
    state: MetadataState,
    #[serde(default)]
    applied_through: Option<u64>,
}

/// The state and the last op applied to it: its queue offset and where it ends in the log.
#[derive(Default)]
struct Applied {
    state: MetadataState,
    last: Option<(u64, LogPos)>,
}

/// The broker's topics and groups.
pub struct Metadata {
    path: PathBuf,
    log: LogWriter,
    state: RwLock<Applied>,
    /// One snapshot write at a time; they share a temporary file.
    snapshot_lock: Mutex<()>,
    config: Arc<BrokerConfig>,
}

/// Checks a topic, group or broker name: letters, digits, `%`, `|`, `_`, `-`.
pub fn validate_name(name: &str, max_len: usize) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if name.len() > max_len {
        return Err(format!(
            "is {} characters; the limit is {max_len}",
            name.len()
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '%' | '|' | '_' | '-')))
    {
        return Err(format!(
            "contains {bad:?}; only letters, digits, '%', '|', '_' and '-' are allowed"
        ));
    }
    Ok(())
}

/// A topic name a client may use at all (route, receive).
pub fn check_topic_name(name: &str) -> ApiResult<()> {
    validate_name(name, MAX_TOPIC_NAME)
        .map_err(|reason| ApiError::new(Code::IllegalTopic, format!("topic {name:?} {reason}")))?;
    if is_system_topic(name) && !name.starts_with(DLQ_PREFIX) {
        return Err(ApiError::new(
            Code::IllegalTopic,
            format!("topic {name:?} is a system topic and cannot be accessed"),
        ));
    }
    Ok(())
}

pub fn is_system_topic(name: &str) -> bool {
    RESERVED_TOPIC_PREFIXES.iter().any(|p| name.starts_with(p))
        || RESERVED_TOPIC_NAMES.contains(&name)
}

pub fn check_group_name(name: &str) -> ApiResult<()> {
    validate_name(name, MAX_GROUP_NAME).map_err(|reason| {
        ApiError::new(
            Code::IllegalConsumerGroup,
            format!("consumer group {name:?} {reason}"),
        )
    })?;
    if is_system_topic(name) {
        return Err(ApiError::new(
            Code::IllegalConsumerGroup,
            format!("consumer group {name:?} uses a reserved prefix"),
        ));
    }
    Ok(())
}

impl Metadata {
    /// Reads the snapshot and applies the ops journaled after it.
    pub fn open(
        dir: &Path,
        config: Arc<BrokerConfig>,
        log: LogWriter,
    ) -> Result<Metadata, BrokerError> {
        let path = dir.join("metadata.json");
        let snapshot: Snapshot = match files::read_optional(&path)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| BrokerError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            None => Snapshot::default(),
        };
        let mut applied = Applied {
            state: snapshot.state,
            last: None,
        };
        let store = log.store().clone();
        if !store.wait_dispatched(store.log().written_pos(), Duration::from_secs(60)) {
            return Err(BrokerError::Corrupt {
                path: dir.join("store"),
                reason: "the store did not dispatch its log within 60 s".into(),
            });
        }
        let mut replayed = 0;
        if let Some(queue) = store.consume_queue(METADATA_TOPIC, 0) {
            let mut from = snapshot.applied_through.map_or(0, |last| last + 1);
            if from > queue.max_offset().0 {
                // The snapshot names ops the log no longer has; new ops will reuse those
                // offsets, so a later open must not skip them.
                tracing::warn!(
                    from,
                    end = queue.max_offset().0,
                    "metadata snapshot ahead of the log"
                );
                from = queue.max_offset().0;
            }
            if from < queue.min_offset().0 {
                tracing::error!(
                    from,
                    first = queue.min_offset().0,
                    "metadata ops after the snapshot are gone from the log"
                );
            }
            for offset in from.max(queue.min_offset().0)..queue.max_offset().0 {
                let corrupt = |reason: String| BrokerError::Corrupt {
                    path: store.dir().join("commitlog"),
                    reason: format!("metadata op {offset}: {reason}"),
                };
                let entry = queue
                    .get(QueueOffset(offset))
                    .ok_or_else(|| corrupt("missing from its queue".into()))?;
                let record = store.read(entry.log_pos)?;
                let op =
                    MetadataOp::decode(record.view().body).map_err(|e| corrupt(e.to_string()))?;
                applied.state.apply(&op);
                applied.last = Some((offset, record.end()));
                replayed += 1;
            }
        }
        let metadata = Metadata {
            path,
            log,
            state: RwLock::new(applied),
            snapshot_lock: Mutex::new(()),
            config,
        };
        if replayed > 0 {
            tracing::info!(replayed, "metadata ops applied after the snapshot");
            metadata.snapshot()?;
        }
        Ok(metadata)
    }

    pub fn topic(&self, name: &str) -> Option<TopicConfig> {
        self.read().state.topics.get(name).cloned()
    }

    pub fn topics(&self) -> Vec<TopicConfig> {
        self.read().state.topics.values().cloned().collect()
    }

    pub fn group(&self, name: &str) -> Option<GroupConfig> {
        self.read().state.groups.get(name).cloned()
    }

    pub fn groups(&self) -> Vec<GroupConfig> {
        self.read().state.groups.values().cloned().collect()
    }

    /// The topic, created with the defaults if it is unknown and auto-creation is on. A
    /// group's dead-letter topic exists as soon as the group does.
    pub fn topic_or_create(&self, name: &str) -> ApiResult<TopicConfig> {
        match self.topic_or_default(name)? {
            (topic, true) => self.put_topic(topic, false),
            (topic, false) => Ok(topic),
        }
    }

    /// The topic, or the one auto-creation would make, not yet saved (`true`): a send checks
    /// its messages against it and creates it only if they are all accepted.
    pub fn topic_or_default(&self, name: &str) -> ApiResult<(TopicConfig, bool)> {
        if let Some(topic) = self.topic(name) {
            return Ok((topic, false));
        }
        if let Some(group) = name.strip_prefix(DLQ_PREFIX).and_then(|g| self.group(g)) {
            return Ok((self.dead_letter_topic(&group)?, false));
        }
        if !self.config.topics.auto_create || is_system_topic(name) {
            return Err(ApiError::new(
                Code::TopicNotFound,
                format!("topic {name:?} does not exist"),
            ));
        }
        let topic = TopicConfig {
            name: name.to_owned(),
            queue_count: self.config.topics.default_queue_count,
            accept_message_types: vec![MessageType::Normal.as_str_name().to_owned()],
        };
        Ok((topic, true))
    }

    /// The dead-letter topic of `group`: one queue, created on first use.
    pub fn dead_letter_topic(&self, group: &GroupConfig) -> ApiResult<TopicConfig> {
        let name = group.dead_letter_topic();
        if let Some(topic) = self.topic(&name) {
            return Ok(topic);
        }
        let topic = TopicConfig {
            name,
            queue_count: 1,
            accept_message_types: vec![MessageType::Normal.as_str_name().to_owned()],
        };
        self.put_topic(topic, false)
    }

    /// Creates (or with `replace`, updates) a topic after checking it.
    pub fn put_topic(&self, topic: TopicConfig, replace: bool) -> ApiResult<TopicConfig> {
        if !topic.is_dead_letter() {
            check_topic_name(&topic.name)?;
        }
        if topic.queue_count == 0 || topic.queue_count > 1024 {
            return Err(ApiError::bad_request(format!(
                "topic.queue_count is {}; it must be between 1 and 1024",
                topic.queue_count
            )));
        }
        if topic.accept_message_types.len() > SUPPORTED_MESSAGE_TYPES.len() {
            return Err(ApiError::bad_request(format!(
                "topic.accept_message_types lists {} types; there are {} (NORMAL, FIFO, DELAY, TRANSACTION)",
                topic.accept_message_types.len(),
                SUPPORTED_MESSAGE_TYPES.len()
            )));
        }
        if topic.accept_message_types.is_empty() {
            return Err(ApiError::bad_request(
                "topic.accept_message_types must name at least one type",
            ));
        }
        for name in &topic.accept_message_types {
            let supported = MessageType::from_str_name(name)
                .is_some_and(|t| SUPPORTED_MESSAGE_TYPES.contains(&t));
            if !supported {
                return Err(ApiError::new(
                    Code::Unsupported,
                    format!(
                        "topic.accept_message_types: {name} is not a type this broker stores (NORMAL, FIFO, DELAY, TRANSACTION)"
                    ),
                ));
            }
        }
        let state = self.write();
        if let Some(existing) = state.state.topics.get(&topic.name) {
            if !replace {
                return Ok(existing.clone());
            }
            if topic.queue_count < existing.queue_count {
                return Err(ApiError::bad_request(format!(
                    "topic.queue_count cannot shrink from {} to {}",
                    existing.queue_count, topic.queue_count
                )));
            }
        }
        self.commit(state, MetadataOp::PutTopic(topic.clone()))?;
        Ok(topic)
    }

    pub fn delete_topic(&self, name: &str) -> ApiResult<()> {
        let state = self.write();
        if !state.state.topics.contains_key(name) {
            return Err(ApiError::new(
                Code::TopicNotFound,
                format!("topic {name:?} does not exist"),
            ));
        }
        self.commit(state, MetadataOp::DeleteTopic(name.to_owned()))
    }

    /// The group, created with the defaults if it is unknown and auto-creation is on.
    pub fn group_or_create(&self, name: &str, now_ms: i64) -> ApiResult<GroupConfig> {
        if let Some(group) = self.group(name) {
            return Ok(group);
        }
        check_group_name(name)?;
        if !self.config.groups.auto_create {
            return Err(ApiError::new(
                Code::ConsumerGroupNotFound,
                format!("consumer group {name:?} does not exist"),
            ));
        }
        self.put_group(self.default_group(name, now_ms), false)
    }

    pub fn default_group(&self, name: &str, now_ms: i64) -> GroupConfig {
        GroupConfig {
            name: name.to_owned(),
            max_delivery_attempts: self.config.groups.max_delivery_attempts,
            start_position: StartPosition::Latest,
            retry_backoff_ms: self.config.groups.retry_backoff_ms.clone(),
            fifo: false,
            created_ms: now_ms,
        }
    }

    pub fn put_group(&self, group: GroupConfig, replace: bool) -> ApiResult<GroupConfig> {
        check_group_name(&group.name)?;
        if group.max_delivery_attempts == 0 {
            return Err(ApiError::bad_request(
                "group.max_delivery_attempts must be at least 1",
            ));
        }
        if group.retry_backoff_ms.len() > MAX_RETRY_BACKOFFS {
            return Err(ApiError::bad_request(format!(
                "group.retry_backoff_ms lists {} back-offs; the limit is {MAX_RETRY_BACKOFFS}",
                group.retry_backoff_ms.len()
            )));
        }
        let state = self.write();
        if let Some(existing) = state.state.groups.get(&group.name)
            && !replace
        {
            return Ok(existing.clone());
        }
        let mut group = group;
        if let Some(existing) = state.state.groups.get(&group.name) {
            group.created_ms = existing.created_ms;
        }
        self.commit(state, MetadataOp::PutGroup(group.clone()))?;
        Ok(group)
    }

    /// Journals `op`, waits until it is committed and only then applies it, all under the
    /// lock: nobody reads a topic or group a crash could take back, and the log's order is
    /// the order of application. Then writes a snapshot. A change that is not committed is
    /// not made. Readers wait for the commit (an fsync in `sync` mode); changes are rare.
    fn commit(
        &self,
        mut state: std::sync::RwLockWriteGuard<'_, Applied>,
        op: MetadataOp,
    ) -> ApiResult<()> {
        let body = op.encode();
        let appended = self.log.propose(&system_record(METADATA_TOPIC, &body))?;
        self.log.wait_committed(Some(appended.end())).map_err(|e| {
            ApiError::new(
                Code::MasterPersistenceTimeout,
                format!("metadata change not committed: {e}"),
            )
        })?;
        state.state.apply(&op);
        state.last = Some((appended.queue_offset.0, appended.end()));
        drop(state);
        if let Err(error) = self.snapshot() {
            // The change is in the log; the next snapshot (or the next open) covers it.
            tracing::warn!(%error, "could not write the metadata snapshot");
        }
        Ok(())
    }

    /// Writes `metadata.json` with the state as it is now, once the ops it holds are durable
    /// (a snapshot must never hold an op a crash can take back from the log).
    fn snapshot(&self) -> Result<(), BrokerError> {
        let _one = self
            .snapshot_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (snapshot, end) = {
            let applied = self.read();
            let snapshot = Snapshot {
                state: applied.state.clone(),
                applied_through: applied.last.map(|(offset, _)| offset),
            };
            (snapshot, applied.last.map(|(_, end)| end))
        };
        if let Some(end) = end {
            self.log.store().durable(end).wait()?;
        }
        let bytes = serde_json::to_vec_pretty(&snapshot).map_err(|e| BrokerError::Corrupt {
            path: self.path.clone(),
            reason: format!("encoding metadata: {e}"),
        })?;
        files::replace_file(self.log.store(), &self.path, &bytes)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Applied> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Applied> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FlushPolicy;
    use ferrumq_storage::{MessageStore, StoreOptions};

    fn store(dir: &Path) -> LogWriter {
        let store = MessageStore::open(&dir.join("store"), StoreOptions::for_tests()).unwrap();
        LogWriter::new(Arc::new(store), FlushPolicy::Sync)
    }

    #[test]
    fn names_follow_rocketmq_rules() {
        assert!(check_topic_name("orders-2024_v1").is_ok());
        assert_eq!(check_topic_name("").unwrap_err().code, Code::IllegalTopic);
        assert_eq!(
            check_topic_name("a b").unwrap_err().code,
            Code::IllegalTopic
        );
        assert_eq!(
            check_topic_name(&"x".repeat(128)).unwrap_err().code,
            Code::IllegalTopic
        );
        assert_eq!(
            check_topic_name("rmq_sys_x").unwrap_err().code,
            Code::IllegalTopic
        );
        assert!(check_topic_name("%DLQ%g").is_ok());
        assert_eq!(
            check_group_name("g/1").unwrap_err().code,
            Code::IllegalConsumerGroup
        );
    }

    #[test]
    fn topics_and_groups_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(BrokerConfig::default());
        let metadata = Metadata::open(dir.path(), config.clone(), store(dir.path())).unwrap();
        metadata.topic_or_create("t").unwrap();
        let mut group = metadata.default_group("g", 42);
        group.max_delivery_attempts = 3;
        metadata.put_group(group, false).unwrap();
        drop(metadata);
        let metadata = Metadata::open(dir.path(), config, store(dir.path())).unwrap();
        assert_eq!(metadata.topic("t").unwrap().queue_count, 8);
        assert_eq!(metadata.group("g").unwrap().max_delivery_attempts, 3);
        assert_eq!(metadata.group("g").unwrap().created_ms, 42);
    }

    #[test]
    fn a_change_that_cannot_be_journaled_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let log = store(dir.path());
        let metadata =
            Metadata::open(dir.path(), Arc::new(BrokerConfig::default()), log.clone()).unwrap();
        metadata.topic_or_create("kept").unwrap();
        // A failed log refuses appends.
        log.store().fail_stop("test");
        assert!(metadata.topic_or_create("t").is_err());
        assert!(metadata.topic("t").is_none());
        assert!(
            metadata
                .put_group(metadata.default_group("g", 1), false)
                .is_err()
        );
        assert!(metadata.group("g").is_none());
        assert!(metadata.delete_topic("kept").is_err());
        assert!(metadata.topic("kept").is_some());
    }

    /// Every change must fit the op's binary form: longer lists are refused, naming the field.
    #[test]
    fn lists_longer_than_an_op_holds_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let metadata = Metadata::open(
            dir.path(),
            Arc::new(BrokerConfig::default()),
            store(dir.path()),
        )
        .unwrap();
        let topic = TopicConfig {
            name: "t".into(),
            queue_count: 1,
            accept_message_types: vec!["NORMAL".into(); SUPPORTED_MESSAGE_TYPES.len() + 1],
        };
        let err = metadata.put_topic(topic, false).unwrap_err();
        assert_eq!(err.code, Code::BadRequest);
        assert!(
            err.message.contains("topic.accept_message_types"),
            "{}",
            err.message
        );
        assert!(metadata.topic("t").is_none());
        let mut group = metadata.default_group("g", 1);
        group.retry_backoff_ms = vec![1000; MAX_RETRY_BACKOFFS + 1];
        let err = metadata.put_group(group.clone(), false).unwrap_err();
        assert_eq!(err.code, Code::BadRequest);
        assert!(
            err.message.contains("group.retry_backoff_ms"),
            "{}",
            err.message
        );
        assert!(metadata.group("g").is_none());
        group.retry_backoff_ms.truncate(MAX_RETRY_BACKOFFS);
        assert!(metadata.put_group(group, false).is_ok());
    }

    /// A change whose op is written but never committed (the disk fails its sync) is not
    /// made: nobody ever reads it.
    #[test]
    fn a_change_that_is_written_but_not_committed_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("store");
        std::fs::create_dir(&data).unwrap();
        let crash = Arc::new(ferrumq_storage::CrashFileSystem::new(&data).unwrap());
        let options = StoreOptions {
            fs: crash.clone(),
            ..StoreOptions::for_tests()
        };
        let store = Arc::new(MessageStore::open(&data, options).unwrap());
        let log = LogWriter::new(store, FlushPolicy::Sync);
        let metadata = Metadata::open(dir.path(), Arc::new(BrokerConfig::default()), log).unwrap();
        metadata.topic_or_create("kept").unwrap();
        crash.cut();
        assert!(metadata.topic_or_create("lost").is_err());
        assert!(metadata.topic("lost").is_none());
        assert!(metadata.topic("kept").is_some());
    }

    /// The log is where changes live: ops journaled after the snapshot on disk (here: a
    /// snapshot put back from before them, or none at all) are applied again at open.
    #[test]
    fn changes_journaled_after_the_snapshot_are_replayed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(BrokerConfig::default());
        let log = store(dir.path());
        let metadata = Metadata::open(dir.path(), config.clone(), log.clone()).unwrap();
        metadata.topic_or_create("first").unwrap();
        let snapshot = dir.path().join("metadata.json");
        let early = std::fs::read(&snapshot).unwrap();
        metadata.topic_or_create("second").unwrap();
        metadata
            .put_group(metadata.default_group("g", 7), false)
            .unwrap();
        metadata.delete_topic("first").unwrap();
        let expected = metadata.read().state.clone();
        drop(metadata);
        log.store().close().unwrap();
        drop(log);

        for put_back in [Some(early), None] {
            match &put_back {
                Some(bytes) => std::fs::write(&snapshot, bytes).unwrap(),
                None => std::fs::remove_file(&snapshot).unwrap(),
            }
            let log = store(dir.path());
            let metadata = Metadata::open(dir.path(), config.clone(), log.clone()).unwrap();
            assert_eq!(metadata.read().state, expected);
            assert!(metadata.topic("first").is_none());
            assert_eq!(metadata.group("g").unwrap().created_ms, 7);
            drop(metadata);
            log.store().close().unwrap();
        }
    }

    /// A `metadata.json` written before ops were journaled (no `applied_through`) is read as
    /// the state before the first op.
    #[test]
    fn a_snapshot_from_before_the_journal_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("metadata.json"),
            r#"{"topics":{"old":{"name":"old","queue_count":4,"accept_message_types":["NORMAL"]}},"groups":{}}"#,
        )
        .unwrap();
        let metadata = Metadata::open(
            dir.path(),
            Arc::new(BrokerConfig::default()),
            store(dir.path()),
        )
        .unwrap();
        assert_eq!(metadata.topic("old").unwrap().queue_count, 4);
    }

    #[test]
    fn unknown_message_types_are_refused_and_the_four_kinds_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let metadata = Metadata::open(
            dir.path(),
            Arc::new(BrokerConfig::default()),
            store(dir.path()),
        )
        .unwrap();
        let topic = |types: &[&str]| TopicConfig {
            name: "d".into(),
            queue_count: 1,
            accept_message_types: types.iter().map(|t| (*t).to_owned()).collect(),
        };
        let err = metadata
            .put_topic(topic(&["DELAY", "LITE"]), false)
            .unwrap_err();
        assert_eq!(err.code, Code::Unsupported);
        assert!(err.message.contains("LITE"), "{}", err.message);
        assert!(metadata.topic("d").is_none());
        let all = ["NORMAL", "FIFO", "DELAY", "TRANSACTION"];
        assert_eq!(
            metadata
                .put_topic(topic(&all), false)
                .unwrap()
                .message_types()
                .len(),
            4
        );
    }
}
