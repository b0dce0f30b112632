//! ferrumq's wire contract, generated from the `.proto` files under `proto/`.
//!
//! - [`v2`]: `apache.rocketmq.v2`, the MessagingService that the official RocketMQ 5 clients
//!   speak. Field numbers and types match the official clients byte for byte.
//! - [`admin`]: `ferrumq.admin.v1`, topics, groups, offsets and messages.
//! - [`cluster`]: `ferrumq.cluster.v1`, broker registration with the nameservers.
//! - [`message_id`]: new message ids in the official clients' format.
//! - [`frame`]: replies that stream messages the broker encoded itself.
//! - [`ack`]: AckMessage as the broker reads and answers it, its strings left in place.
//! - [`consumed`]: replies as the native client reads them, without the fields it ignores.
//! - [`session`]: what every access point does for a client session (client id, Settings,
//!   Telemetry).

#![allow(
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    reason = "generated code"
)]

/// The generated code refers to other packages by relative module paths, so the modules
/// mirror the protobuf packages; [`v2`], [`admin`] and [`cluster`] are the short names. Each
/// holds its messages and clients, then its servers (generated apart, see `build.rs`).
pub mod apache {
    pub mod rocketmq {
        pub mod v2 {
            tonic::include_proto!("apache.rocketmq.v2");
            include!(concat!(env!("OUT_DIR"), "/server/apache.rocketmq.v2.rs"));
        }
    }
}

/// See [`apache`].
pub mod ferrumq {
    pub mod admin {
        pub mod v1 {
            tonic::include_proto!("ferrumq.admin.v1");
            include!(concat!(env!("OUT_DIR"), "/server/ferrumq.admin.v1.rs"));
        }
    }
    pub mod cluster {
        pub mod v1 {
            tonic::include_proto!("ferrumq.cluster.v1");
            include!(concat!(env!("OUT_DIR"), "/server/ferrumq.cluster.v1.rs"));
        }
    }
}

pub mod ack;
pub mod codec;
pub mod consumed;
pub mod frame;
pub mod message_id;
pub mod send;
pub mod session;

pub use apache::rocketmq::v2;
pub use ferrumq::admin::v1 as admin;
pub use ferrumq::cluster::v1 as cluster;

impl v2::Status {
    /// A status with `code` and `message`.
    pub fn new(code: v2::Code, message: impl Into<String>) -> v2::Status {
        v2::Status {
            code: code as i32,
            message: message.into(),
        }
    }

    /// The OK status.
    pub fn ok() -> v2::Status {
        v2::Status::new(v2::Code::Ok, "OK")
    }
}

/// A protobuf duration of `ms` milliseconds.
pub fn duration_from_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}
