//! `ferrumq-admin`: the operator's command line over a broker's admin service. Nouns and
//! verbs (`ferrumq-admin topic create orders --queues 8`), a table by default and JSON with
//! `--output json`, exit code 1 with a message on stderr when something is refused.

mod commands;
mod output;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ferrumq_protocol::admin::admin_service_client::AdminServiceClient;
use tonic::transport::{Channel, Endpoint};

use output::Format;

#[derive(Parser)]
#[command(name = "ferrumq-admin", version, about = "Administer a ferrumq broker")]
struct Cli {
    /// The broker's gRPC address, host:port.
    #[arg(
        long,
        global = true,
        env = "FERRUMQ_ENDPOINT",
        default_value = "127.0.0.1:8081"
    )]
    endpoint: String,
    /// `table` for people, `json` for scripts.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    noun: Noun,
}

#[derive(Subcommand)]
enum Noun {
    /// The broker and the cluster it knows.
    Cluster {
        #[command(subcommand)]
        verb: ClusterVerb,
    },
    Topic {
        #[command(subcommand)]
        verb: TopicVerb,
    },
    /// Consumer groups.
    Group {
        #[command(subcommand)]
        verb: GroupVerb,
    },
    /// Replay: move a group's position in a topic.
    Offset {
        #[command(subcommand)]
        verb: OffsetVerb,
    },
    /// Find messages by id or key.
    Message {
        #[command(subcommand)]
        verb: MessageVerb,
    },
    /// Dead letters: messages a group gave up on.
    Dlq {
        #[command(subcommand)]
        verb: DlqVerb,
    },
    /// Transactional messages.
    Txn {
        #[command(subcommand)]
        verb: TxnVerb,
    },
}

#[derive(Subcommand)]
enum ClusterVerb {
    /// The broker's state and the brokers in its route table.
    Status,
}

#[derive(Args)]
pub(crate) struct TopicSettings {
    pub(crate) name: String,
    /// Queues. Create: the broker's default when left out. Update: unchanged when left out.
    #[arg(long)]
    pub(crate) queues: Option<u32>,
    /// Message types producers may send, comma-separated: NORMAL, FIFO, DELAY, TRANSACTION.
    /// Create: NORMAL when left out. Update: unchanged when left out.
    #[arg(long, value_delimiter = ',')]
    pub(crate) types: Option<Vec<String>>,
}

#[derive(Subcommand)]
enum TopicVerb {
    Create(TopicSettings),
    /// Change an existing topic's queues or message types.
    Update(TopicSettings),
    Delete {
        name: String,
    },
    List {
        /// Include dead-letter and system topics.
        #[arg(long)]
        internal: bool,
    },
    /// The topic's settings and each queue's offsets.
    Describe {
        name: String,
    },
}

#[derive(Args)]
pub(crate) struct GroupSettings {
    pub(crate) name: String,
    /// Deliveries before a message is dead-lettered; 0 means the broker's default.
    #[arg(long, default_value_t = 0)]
    pub(crate) max_attempts: u32,
    /// Where the group starts in queues it has never read (latest when left out).
    #[arg(long, value_enum)]
    pub(crate) from: Option<commands::Start>,
    /// Deliver each message group's messages one at a time, in order.
    #[arg(long)]
    pub(crate) fifo: bool,
    /// Waits before redelivery attempts 2, 3, ... in ms, comma-separated; the last repeats.
    #[arg(long, value_delimiter = ',')]
    pub(crate) retry_backoff_ms: Vec<u64>,
}

/// What `group update` changes; what it leaves out stays as it is.
#[derive(Args)]
pub(crate) struct GroupUpdate {
    pub(crate) name: String,
    #[arg(long)]
    pub(crate) max_attempts: Option<u32>,
    #[arg(long, value_enum)]
    pub(crate) from: Option<commands::Start>,
    #[arg(long, conflicts_with = "no_fifo")]
    pub(crate) fifo: bool,
    /// Deliver the group's messages without regard to message groups.
    #[arg(long)]
    pub(crate) no_fifo: bool,
    #[arg(long, value_delimiter = ',')]
    pub(crate) retry_backoff_ms: Option<Vec<u64>>,
}

#[derive(Subcommand)]
enum GroupVerb {
    Create(GroupSettings),
    /// Change an existing group's settings.
    Update(GroupUpdate),
    List,
    /// Per queue: acked and delivered offsets, messages in flight, lag.
    Describe {
        name: String,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct ResetTarget {
    /// The first message stored at or after this RFC 3339 time.
    #[arg(long, value_parser = output::parse_time)]
    pub(crate) to_time: Option<i64>,
    /// This offset in each queue (bounded by what the queue holds).
    #[arg(long)]
    pub(crate) to_offset: Option<u64>,
}

#[derive(Subcommand)]
enum OffsetVerb {
    /// Move a group to a time or offset; consumers see it at their next receive.
    Reset {
        #[arg(long)]
        group: String,
        #[arg(long)]
        topic: String,
        #[command(flatten)]
        target: ResetTarget,
        /// Only these queues (repeat the flag); every queue by default.
        #[arg(long = "queue")]
        queues: Vec<u32>,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct QueryBy {
    #[arg(long)]
    pub(crate) id: Option<String>,
    #[arg(long)]
    pub(crate) key: Option<String>,
}

#[derive(Subcommand)]
enum MessageVerb {
    /// Messages of a topic by id or key, optionally stored between two times.
    Query {
        #[arg(long)]
        topic: String,
        #[command(flatten)]
        by: QueryBy,
        #[arg(long, value_parser = output::parse_time)]
        from: Option<i64>,
        #[arg(long, value_parser = output::parse_time)]
        to: Option<i64>,
        #[arg(long, default_value_t = 32)]
        max: u32,
    },
    /// One message: properties, what each group did with it, the body.
    Show {
        id: String,
        /// Only the copy in this topic.
        #[arg(long)]
        topic: Option<String>,
    },
}

#[derive(Args)]
#[group(required = true, multiple = false)]
pub(crate) struct ResendWhich {
    /// This message (repeat the flag for more).
    #[arg(long = "id")]
    pub(crate) ids: Vec<String>,
    /// Every waiting dead letter of the group.
    #[arg(long)]
    pub(crate) all: bool,
}

#[derive(Subcommand)]
enum DlqVerb {
    /// Waiting dead letters, oldest first.
    List {
        #[arg(long)]
        group: String,
        #[arg(long, default_value_t = 100)]
        max: u32,
    },
    /// Send dead letters back to their topic, keeping their message ids.
    Resend {
        #[arg(long)]
        group: String,
        #[command(flatten)]
        which: ResendWhich,
    },
    /// Drop every waiting dead letter of the group.
    Purge {
        #[arg(long)]
        group: String,
        /// Confirm: the dead letters cannot be resent afterwards.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum TxnVerb {
    /// Transactions checked the most times without a decision, then dropped.
    ListDiscarded {
        #[arg(long)]
        topic: Option<String>,
        #[arg(long, default_value_t = 100)]
        max: u32,
    },
}

/// Opens a channel to the broker, failing fast with the address when nobody answers.
async fn connect(endpoint: &str) -> anyhow::Result<AdminServiceClient<Channel>> {
    let url = if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    };
    let channel = Endpoint::from_shared(url)
        .map_err(|e| anyhow::anyhow!("--endpoint {endpoint:?} is not an address: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect()
        .await
        .map_err(|e| {
            // The innermost cause says what happened ("Connection refused").
            let mut cause: &dyn std::error::Error = &e;
            while let Some(inner) = cause.source() {
                cause = inner;
            }
            anyhow::anyhow!(
                "cannot reach a broker at {endpoint} ({cause}); check --endpoint or FERRUMQ_ENDPOINT"
            )
        })?;
    Ok(AdminServiceClient::new(channel))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut admin = connect(&cli.endpoint).await?;
    let out = cli.output;
    let admin = &mut admin;
    match cli.noun {
        Noun::Cluster {
            verb: ClusterVerb::Status,
        } => commands::cluster_status(admin, out).await,
        Noun::Topic { verb } => match verb {
            TopicVerb::Create(settings) => commands::put_topic(admin, out, settings, false).await,
            TopicVerb::Update(settings) => commands::put_topic(admin, out, settings, true).await,
            TopicVerb::Delete { name } => commands::delete_topic(admin, out, name).await,
            TopicVerb::List { internal } => commands::list_topics(admin, out, internal).await,
            TopicVerb::Describe { name } => commands::describe_topic(admin, out, name).await,
        },
        Noun::Group { verb } => match verb {
            GroupVerb::Create(settings) => commands::create_group(admin, out, settings).await,
            GroupVerb::Update(update) => commands::update_group(admin, out, update).await,
            GroupVerb::List => commands::list_groups(admin, out).await,
            GroupVerb::Describe { name } => commands::describe_group(admin, out, name).await,
        },
        Noun::Offset {
            verb:
                OffsetVerb::Reset {
                    group,
                    topic,
                    target,
                    queues,
                },
        } => commands::reset_offset(admin, out, group, topic, target, queues).await,
        Noun::Message { verb } => match verb {
            MessageVerb::Query {
                topic,
                by,
                from,
                to,
                max,
            } => commands::query_messages(admin, out, topic, by, (from, to), max).await,
            MessageVerb::Show { id, topic } => commands::show_message(admin, out, id, topic).await,
        },
        Noun::Dlq { verb } => match verb {
            DlqVerb::List { group, max } => {
                commands::list_dead_letters(admin, out, group, max).await
            }
            DlqVerb::Resend { group, which } => {
                commands::resend_dead_letters(admin, out, group, which).await
            }
            DlqVerb::Purge { group, yes } => {
                commands::purge_dead_letters(admin, out, group, yes).await
            }
        },
        Noun::Txn {
            verb: TxnVerb::ListDiscarded { topic, max },
        } => commands::list_discarded(admin, out, topic, max).await,
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
