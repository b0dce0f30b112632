//! Topics and consumer groups, kept in `metadata.json` in the data directory and replaced
//! atomically on every change.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use ferrumq_protocol::v2::{Code, MessageType};
use ferrumq_storage::MessageStore;
use serde::{Deserialize, Serialize};

use crate::config::BrokerConfig;
use crate::error::{ApiError, ApiResult, BrokerError};
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

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct MetadataFile {
    topics: BTreeMap<String, TopicConfig>,
    groups: BTreeMap<String, GroupConfig>,
}

/// The broker's topics and groups. Reads are cheap clones of `Arc`s; writes rewrite the file.
pub struct Metadata {
    path: PathBuf,
    /// Where the metadata file's syncs go, and what stops when one fails.
    store: Arc<MessageStore>,
    state: RwLock<MetadataFile>,
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
    pub fn open(
        dir: &Path,
        config: Arc<BrokerConfig>,
        store: Arc<MessageStore>,
    ) -> Result<Metadata, BrokerError> {
        let path = dir.join("metadata.json");
        let state = match files::read_optional(&path)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| BrokerError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?,
            None => MetadataFile::default(),
        };
        Ok(Metadata {
            path,
            store,
            state: RwLock::new(state),
            config,
        })
    }

    pub fn topic(&self, name: &str) -> Option<TopicConfig> {
        self.read().topics.get(name).cloned()
    }

    pub fn topics(&self) -> Vec<TopicConfig> {
        self.read().topics.values().cloned().collect()
    }

    pub fn group(&self, name: &str) -> Option<GroupConfig> {
        self.read().groups.get(name).cloned()
    }

    pub fn groups(&self) -> Vec<GroupConfig> {
        self.read().groups.values().cloned().collect()
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
        let mut state = self.write();
        if let Some(existing) = state.topics.get(&topic.name) {
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
        let mut next = state.clone();
        next.topics.insert(topic.name.clone(), topic.clone());
        self.commit(&mut state, next)?;
        Ok(topic)
    }

    pub fn delete_topic(&self, name: &str) -> ApiResult<()> {
        let mut state = self.write();
        let mut next = state.clone();
        if next.topics.remove(name).is_none() {
            return Err(ApiError::new(
                Code::TopicNotFound,
                format!("topic {name:?} does not exist"),
            ));
        }
        self.commit(&mut state, next)
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
        let mut state = self.write();
        if let Some(existing) = state.groups.get(&group.name)
            && !replace
        {
            return Ok(existing.clone());
        }
        let mut group = group;
        if let Some(existing) = state.groups.get(&group.name) {
            group.created_ms = existing.created_ms;
        }
        let mut next = state.clone();
        next.groups.insert(group.name.clone(), group.clone());
        self.commit(&mut state, next)?;
        Ok(group)
    }

    /// Saves `next`, then makes it the state: a change that cannot be saved is not made.
    fn commit(&self, state: &mut MetadataFile, next: MetadataFile) -> ApiResult<()> {
        let bytes = serde_json::to_vec_pretty(&next)
            .map_err(|e| ApiError::internal(format!("encoding metadata: {e}")))?;
        files::replace_file(&self.store, &self.path, &bytes)
            .map_err(|e| ApiError::internal(format!("saving metadata: {e}")))?;
        *state = next;
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, MetadataFile> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, MetadataFile> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrumq_storage::StoreOptions;

    fn store(dir: &Path) -> Arc<MessageStore> {
        Arc::new(MessageStore::open(&dir.join("store"), StoreOptions::for_tests()).unwrap())
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
    fn a_change_that_cannot_be_saved_is_not_made() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let metadata =
            Metadata::open(&data, Arc::new(BrokerConfig::default()), store(dir.path())).unwrap();
        metadata.topic_or_create("kept").unwrap();
        // A file where the directory was: the metadata file can no longer be written.
        std::fs::remove_dir_all(&data).unwrap();
        std::fs::write(&data, b"").unwrap();
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
