// A broker on free ports in a temporary directory, for the integration tests and the crate
// docs' examples (which include this file), and admin calls to set up topics and groups.
// Whoever declares the module allows dead_code, unreachable_pub, unwrap_used, expect_used.

use ferrumq_broker::{BrokerConfig, RunningBroker};
use ferrumq_protocol::admin::admin_service_client::AdminServiceClient;
use ferrumq_protocol::admin::{
    CreateGroupRequest, CreateTopicRequest, Group, StartPosition, Topic,
};
use tempfile::TempDir;

pub type AnyError = Box<dyn std::error::Error + Send + Sync>;

pub struct TestBroker {
    pub running: RunningBroker,
    pub dir: TempDir,
}

impl TestBroker {
    pub fn access_point(&self) -> String {
        self.running.grpc_addr.to_string()
    }
}

pub fn config(dir: &TempDir) -> BrokerConfig {
    let mut config = BrokerConfig {
        data_dir: dir.path().to_owned(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        segment_size_bytes: 16 << 20,
        // Tests must not fail because the machine's disk happens to be nearly full.
        disk_watermark: 1.0,
        ..BrokerConfig::default()
    };
    config.limits.min_invisible_ms = 1000;
    config
}

/// A standalone broker; `tweak` adjusts its config.
pub async fn start(tweak: impl FnOnce(&mut BrokerConfig)) -> Result<TestBroker, AnyError> {
    let dir = tempfile::tempdir()?;
    let mut config = config(&dir);
    tweak(&mut config);
    let running = ferrumq_broker::start(config).await?;
    Ok(TestBroker { running, dir })
}

/// For the docs: a broker, its directory and its access point.
pub async fn broker() -> Result<(RunningBroker, TempDir, String), AnyError> {
    let TestBroker { running, dir } = start(|_| {}).await?;
    let access_point = running.grpc_addr.to_string();
    Ok((running, dir, access_point))
}

async fn admin(access_point: &str) -> AdminServiceClient<tonic::transport::Channel> {
    AdminServiceClient::connect(format!("http://{access_point}"))
        .await
        .unwrap()
}

/// A topic that accepts `types` (`"FIFO"`, `"DELAY"`, `"TRANSACTION"`, `"NORMAL"`).
pub async fn create_topic(access_point: &str, name: &str, queue_count: u32, types: &[&str]) {
    admin(access_point)
        .await
        .create_topic(CreateTopicRequest {
            topic: Some(Topic {
                name: name.to_owned(),
                queue_count,
                accept_message_types: types
                    .iter()
                    .map(|t| ferrumq_protocol::v2::MessageType::from_str_name(t).unwrap() as i32)
                    .collect(),
            }),
            update_existing: true,
        })
        .await
        .unwrap();
}

/// A group that reads from the start of each queue, so no test races its producer.
pub async fn create_group(
    access_point: &str,
    name: &str,
    max_delivery_attempts: u32,
    retry_backoff_ms: &[u64],
    fifo: bool,
) {
    admin(access_point)
        .await
        .create_group(CreateGroupRequest {
            group: Some(Group {
                name: name.to_owned(),
                max_delivery_attempts,
                start_position: StartPosition::Earliest as i32,
                retry_backoff_ms: retry_backoff_ms.to_vec(),
                fifo,
            }),
            update_existing: true,
        })
        .await
        .unwrap();
}
