//! The broker's configuration: a TOML file whose every key is optional. Unknown keys are an
//! error, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything the broker can be told. `BrokerConfig::default()` is standalone mode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Where the commit log, queues, metadata and consumer state live.
    pub data_dir: PathBuf,
    /// The RocketMQ v2 gRPC port (MessagingService, admin and cluster services).
    pub grpc_listen: SocketAddr,
    /// Health, readiness and Prometheus metrics.
    pub http_listen: SocketAddr,
    /// The `host:port` clients are told to use for this broker; defaults to `grpc_listen`.
    pub advertised_endpoint: Option<String>,
    /// Nameservers to join, as `host:port`. Empty: run an embedded one (standalone).
    pub nameservers: Vec<String>,
    pub cluster_name: String,
    pub broker_name: String,
    /// `sync`: the reply waits for fsync (group commit). `async`: flushed every
    /// `async_flush_interval_ms`, the reply does not wait.
    pub flush: FlushPolicy,
    pub async_flush_interval_ms: u64,
    pub segment_size_bytes: u64,
    /// Commit-log segments older than this many hours are deleted; 0 keeps everything.
    pub retention_hours: u64,
    /// Sends are refused (`TOO_MANY_REQUESTS`, HTTP 429) while the data disk is fuller than
    /// this fraction, so acks and consumer state can still be written.
    pub disk_watermark: f64,
    /// A send whose message id was stored in the last `duplicate_window_ms` (among the last
    /// `duplicate_window_ids` sends) is answered as the first was and not stored again: a
    /// producer's retry. 0 turns this off. The window takes about 40 bytes a send.
    pub duplicate_window_ms: u64,
    pub duplicate_window_ids: usize,
    pub topics: TopicDefaults,
    pub groups: GroupDefaults,
    pub limits: Limits,
    pub transactions: TransactionSettings,
    pub timers: TimerSettings,
    /// How often this broker re-registers with the nameservers, and how long a nameserver
    /// keeps a broker it has not heard from.
    pub heartbeat_interval_ms: u64,
    pub broker_expiry_ms: u64,
    /// How long one call to a nameserver (registration, route query, connecting included) may
    /// take before the next nameserver is tried.
    pub nameserver_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushPolicy {
    Sync,
    Async,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopicDefaults {
    /// Create a topic the first time a client names it (QueryRoute, SendMessage).
    pub auto_create: bool,
    pub default_queue_count: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupDefaults {
    /// Create a consumer group the first time a client names it.
    pub auto_create: bool,
    /// Deliveries of one message before it goes to `%DLQ%{group}`.
    pub max_delivery_attempts: u32,
    /// Waits a push consumer applies before redelivery attempt 2, 3, ... (the last repeats).
    pub retry_backoff_ms: Vec<u64>,
}

/// When the broker asks producers about transactions they left open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransactionSettings {
    /// A half message is first checked this long after it was stored, unless its producer
    /// set `orphaned_transaction_recovery_duration`.
    pub check_immunity_ms: u64,
    /// Time between two checks of one transaction.
    pub check_interval_ms: u64,
    /// After this many checks without a decision the half message is discarded.
    pub max_checks: u32,
    /// A transaction still undecided this long after it was stored is discarded, even if
    /// not all its checks could be made for want of a producer to ask. At most
    /// `retention_hours` less one hour, so that retention never deletes a half message
    /// before it is decided or discarded.
    pub max_pending_ms: u64,
}

/// Scheduled (DELAY) messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimerSettings {
    /// Scheduled messages are filed on disk in slots of this many milliseconds of delivery
    /// time; the slots due within `memory_window_ms` are also held in memory.
    pub slot_ms: u64,
    pub memory_window_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_properties: usize,
    /// Keys plus values of all properties, tag and keys included.
    pub max_properties_bytes: usize,
    pub max_batch_messages: usize,
    pub max_message_group_bytes: usize,
    /// The latest delivery time a producer may ask for, counted from now. At most
    /// `retention_hours` less one hour: a scheduled message waits in the commit log, and
    /// retention must not delete it before it is due.
    pub max_delay_ms: u64,
    /// The most messages one receive hands out. RocketMQ caps it at 32; a larger cap lets a
    /// client that asks for more pay the per-request cost once per many messages.
    pub max_receive_batch: u32,
    /// The receive batch push consumers are told to use in the Settings reply.
    pub push_receive_batch: u32,
    pub min_invisible_ms: u64,
    pub max_invisible_ms: u64,
    pub max_long_polling_ms: u64,
    /// A push consumer's receive (auto-renew) takes a lease this long, which the broker
    /// extends `push_lease_renew_ahead_ms` before it ends while the client stays connected,
    /// for at most `push_lease_max_ms` in all.
    pub push_lease_ms: u64,
    pub push_lease_renew_ahead_ms: u64,
    pub push_lease_max_ms: u64,
    /// When a push consumer disconnects, its leased messages become visible this much later.
    pub push_lease_release_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> BrokerConfig {
        BrokerConfig {
            data_dir: PathBuf::from("./data"),
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            advertised_endpoint: None,
            nameservers: Vec::new(),
            cluster_name: "DefaultCluster".to_owned(),
            broker_name: "broker-a".to_owned(),
            flush: FlushPolicy::Sync,
            async_flush_interval_ms: 200,
            segment_size_bytes: 1 << 30,
            retention_hours: 72,
            disk_watermark: 0.90,
            duplicate_window_ms: 120_000,
            duplicate_window_ids: 1_000_000,
            topics: TopicDefaults::default(),
            groups: GroupDefaults::default(),
            limits: Limits::default(),
            transactions: TransactionSettings::default(),
            timers: TimerSettings::default(),
            heartbeat_interval_ms: 10_000,
            broker_expiry_ms: 30_000,
            nameserver_timeout_ms: 3_000,
        }
    }
}

impl Default for TopicDefaults {
    fn default() -> TopicDefaults {
        TopicDefaults {
            auto_create: true,
            default_queue_count: 8,
        }
    }
}

/// RocketMQ's default schedule: 1s 5s 10s 30s 1m 2m ... 10m 20m 30m 1h 2h.
const DEFAULT_BACKOFF_SECS: [u64; 16] = [
    1, 5, 10, 30, 60, 120, 180, 240, 300, 360, 420, 480, 540, 600, 1200, 1800,
];

impl Default for GroupDefaults {
    fn default() -> GroupDefaults {
        GroupDefaults {
            auto_create: true,
            max_delivery_attempts: 17,
            retry_backoff_ms: DEFAULT_BACKOFF_SECS.iter().map(|s| s * 1000).collect(),
        }
    }
}

impl Default for TransactionSettings {
    fn default() -> TransactionSettings {
        TransactionSettings {
            check_immunity_ms: 6_000,
            check_interval_ms: 30_000,
            max_checks: 15,
            max_pending_ms: 24 * 3600 * 1000,
        }
    }
}

impl Default for TimerSettings {
    fn default() -> TimerSettings {
        TimerSettings {
            slot_ms: 10_000,
            memory_window_ms: 20_000,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body_bytes: 4 << 20,
            max_properties: 128,
            max_properties_bytes: 16 << 10,
            max_batch_messages: 1024,
            max_message_group_bytes: 64,
            max_delay_ms: 48 * 3600 * 1000,
            max_receive_batch: 1024,
            push_receive_batch: 32,
            min_invisible_ms: 10_000,
            max_invisible_ms: 12 * 3600 * 1000,
            max_long_polling_ms: 20_000,
            push_lease_ms: 60_000,
            push_lease_renew_ahead_ms: 10_000,
            push_lease_max_ms: 3 * 3600 * 1000,
            push_lease_release_ms: 1_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl BrokerConfig {
    /// Reads a TOML file; keys it does not set keep their defaults.
    pub fn load(path: &Path) -> Result<BrokerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: BrokerConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The defaults as a TOML document, for `--print-default-config`.
    pub fn default_toml() -> String {
        toml::to_string(&BrokerConfig::default()).unwrap_or_default()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, reason: &str| {
            Err(ConfigError::Invalid {
                field,
                reason: reason.to_owned(),
            })
        };
        if self.topics.default_queue_count == 0 || self.topics.default_queue_count > 1024 {
            return invalid("topics.default_queue_count", "must be between 1 and 1024");
        }
        if self.groups.max_delivery_attempts == 0 {
            return invalid("groups.max_delivery_attempts", "must be at least 1");
        }
        if self.limits.min_invisible_ms > self.limits.max_invisible_ms {
            return invalid(
                "limits.min_invisible_ms",
                "must not exceed limits.max_invisible_ms",
            );
        }
        if self.limits.push_lease_renew_ahead_ms >= self.limits.push_lease_ms {
            return invalid(
                "limits.push_lease_renew_ahead_ms",
                "must be below limits.push_lease_ms",
            );
        }
        if self.limits.max_receive_batch == 0 {
            return invalid("limits.max_receive_batch", "must be at least 1");
        }
        if !(1..=self.limits.max_receive_batch).contains(&self.limits.push_receive_batch) {
            return invalid(
                "limits.push_receive_batch",
                "must be at least 1 and at most limits.max_receive_batch",
            );
        }
        if self.async_flush_interval_ms == 0 {
            return invalid("async_flush_interval_ms", "must be at least 1");
        }
        if self.heartbeat_interval_ms == 0 || self.broker_expiry_ms <= self.heartbeat_interval_ms {
            return invalid(
                "broker_expiry_ms",
                "must be above heartbeat_interval_ms, which must be above zero",
            );
        }
        if self.nameserver_timeout_ms == 0 {
            return invalid("nameserver_timeout_ms", "must be at least 1");
        }
        if self.transactions.check_interval_ms == 0 || self.transactions.max_checks == 0 {
            return invalid(
                "transactions.check_interval_ms",
                "check_interval_ms and max_checks must be above zero",
            );
        }
        if self.timers.slot_ms == 0 || self.timers.memory_window_ms < self.timers.slot_ms {
            return invalid(
                "timers.slot_ms",
                "must be above zero and at most timers.memory_window_ms",
            );
        }
        let retention_ms = self.retention_hours.saturating_mul(3600 * 1000);
        let kept_ms = retention_ms.saturating_sub(3600 * 1000);
        if self.retention_hours > 0 && self.limits.max_delay_ms > kept_ms {
            return invalid(
                "limits.max_delay_ms",
                "must be at most retention_hours less one hour: retention would delete a scheduled message before it is due",
            );
        }
        if self.retention_hours > 0 && self.transactions.max_pending_ms > kept_ms {
            return invalid(
                "transactions.max_pending_ms",
                "must be at most retention_hours less one hour: retention would delete a half message before it is decided",
            );
        }
        if !(0.0..=1.0).contains(&self.disk_watermark) {
            return invalid("disk_watermark", "must be a fraction between 0.0 and 1.0");
        }
        crate::metadata::validate_name(&self.broker_name, 127)
            .or_else(|reason| invalid("broker_name", &reason))?;
        Ok(())
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn nameserver_timeout(&self) -> Duration {
        Duration::from_millis(self.nameserver_timeout_ms)
    }

    pub fn broker_expiry(&self) -> Duration {
        Duration::from_millis(self.broker_expiry_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_defaults_parse_back_to_the_defaults() {
        let parsed: BrokerConfig = toml::from_str(&BrokerConfig::default_toml()).unwrap();
        assert_eq!(parsed, BrokerConfig::default());
    }

    #[test]
    fn a_zero_nameserver_timeout_is_refused_by_name() {
        let config = BrokerConfig {
            nameserver_timeout_ms: 0,
            ..BrokerConfig::default()
        };
        let Err(ConfigError::Invalid { field, .. }) = config.validate() else {
            panic!("a nameserver timeout of 0 was accepted");
        };
        assert_eq!(field, "nameserver_timeout_ms");
    }

    #[test]
    fn a_push_receive_batch_above_the_receive_cap_is_refused_by_name() {
        let mut config = BrokerConfig::default();
        config.limits.max_receive_batch = 16;
        let Err(ConfigError::Invalid { field, .. }) = config.validate() else {
            panic!("a push batch of 32 above a cap of 16 was accepted");
        };
        assert_eq!(field, "limits.push_receive_batch");
        config.limits.push_receive_batch = 16;
        assert!(config.validate().is_ok());
    }

    #[test]
    fn the_defaults_are_the_limits_rocketmq_users_expect() {
        let config = BrokerConfig::default();
        assert_eq!(config.flush, FlushPolicy::Sync);
        assert_eq!(config.groups.max_delivery_attempts, 17);
        let limits = config.limits.clone();
        let limits_max_delay = limits.max_delay_ms;
        assert_eq!(limits.max_body_bytes, 4 << 20);
        assert_eq!(
            (limits.max_properties, limits.max_properties_bytes),
            (128, 16 << 10)
        );
        assert_eq!(
            (limits.min_invisible_ms, limits.max_invisible_ms),
            (10_000, 12 * 3600 * 1000)
        );
        assert_eq!(
            (limits.max_receive_batch, limits.push_receive_batch),
            (1024, 32)
        );
        assert_eq!(limits.max_long_polling_ms, 20_000);
        assert_eq!(config.transactions, TransactionSettings::default());
        assert_eq!(
            (
                config.transactions.check_immunity_ms,
                config.transactions.check_interval_ms,
                config.transactions.max_checks
            ),
            (6_000, 30_000, 15)
        );
        assert_eq!(limits_max_delay, 48 * 3600 * 1000);
    }

    #[test]
    fn a_scheduled_message_cannot_outlive_retention() {
        let mut config = BrokerConfig::default();
        config.limits.max_delay_ms = 72 * 3600 * 1000;
        let Err(ConfigError::Invalid { field, .. }) = config.validate() else {
            panic!("a delay as long as retention passed validation");
        };
        assert_eq!(field, "limits.max_delay_ms");
        config.retention_hours = 0;
        assert!(config.validate().is_ok(), "retention 0 keeps everything");
        config.retention_hours = 73;
        assert!(config.validate().is_ok());
        config.transactions.max_pending_ms = 73 * 3600 * 1000;
        let Err(ConfigError::Invalid { field, .. }) = config.validate() else {
            panic!("a pending transaction as long as retention passed validation");
        };
        assert_eq!(field, "transactions.max_pending_ms");
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = toml::from_str::<BrokerConfig>("grpc_listn = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("grpc_listn"), "{err}");
        let err = toml::from_str::<BrokerConfig>("[limits]\nmax_body = 1").unwrap_err();
        assert!(err.to_string().contains("max_body"), "{err}");
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let parsed: BrokerConfig =
            toml::from_str("flush = \"async\"\n[groups]\nmax_delivery_attempts = 3\n").unwrap();
        assert_eq!(parsed.flush, FlushPolicy::Async);
        assert_eq!(parsed.groups.max_delivery_attempts, 3);
        assert_eq!(parsed.limits, Limits::default());
    }
}
