//! Compiles the `.proto` files with `protox` (a protobuf compiler written in Rust), so no
//! system `protoc` is needed.
//!
//! Three passes. The first generates the messages and the clients. The second generates only
//! the servers, into `server/`, with every message taken from the first pass except the two
//! streamed replies that carry stored messages, whose servers send the `Frame`s of
//! `src/frame.rs` (which can hold a message the broker has already encoded), and AckMessage's
//! request and reply, read and written as the lean types of `src/ack.rs`. The third
//! generates, into `consumer/`, a second MessagingService client for the native client,
//! which reads the replies of receives, pulls and acks as the lean types of
//! `src/consumed.rs`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/apache/rocketmq/v2/definition.proto",
        "proto/apache/rocketmq/v2/service.proto",
        "proto/ferrumq/admin/v1/admin.proto",
        "proto/ferrumq/cluster/v1/cluster.proto",
    ];
    let descriptors = protox::compile(protos, ["proto"])?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .codec_path("crate::codec::GrpcCodec")
        // Bodies stay in the buffer they arrived in instead of being copied out.
        .bytes(".apache.rocketmq.v2.Message.body")
        .compile_fds(descriptors.clone())?;

    let mut services_only = descriptors;
    for file in &mut services_only.file {
        file.message_type.clear();
        file.enum_type.clear();
    }
    let server_dir = PathBuf::from(std::env::var("OUT_DIR")?).join("server");
    std::fs::create_dir_all(&server_dir)?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .generate_default_stubs(true)
        .codec_path("crate::codec::GrpcCodec")
        .out_dir(server_dir)
        .extern_path(".apache.rocketmq.v2", "crate::v2")
        .extern_path(".ferrumq.admin.v1", "crate::admin")
        .extern_path(".ferrumq.cluster.v1", "crate::cluster")
        .extern_path(
            ".apache.rocketmq.v2.ReceiveMessageResponse",
            "crate::frame::ReceiveFrame",
        )
        .extern_path(
            ".apache.rocketmq.v2.PullMessageResponse",
            "crate::frame::PullFrame",
        )
        .extern_path(
            ".apache.rocketmq.v2.AckMessageRequest",
            "crate::ack::AckRequest",
        )
        .extern_path(
            ".apache.rocketmq.v2.SendMessageRequest",
            "crate::send::SendRequest",
        )
        .extern_path(
            ".apache.rocketmq.v2.AckMessageResponse",
            "crate::ack::AckResponse",
        )
        .compile_fds(services_only.clone())?;

    // The native client's MessagingService client, reading consumers' replies lean.
    let mut messaging = services_only;
    messaging
        .file
        .retain(|file| file.package() == "apache.rocketmq.v2");
    let consumer_dir = PathBuf::from(std::env::var("OUT_DIR")?).join("consumer");
    std::fs::create_dir_all(&consumer_dir)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .codec_path("crate::codec::GrpcCodec")
        .out_dir(consumer_dir)
        .extern_path(".apache.rocketmq.v2", "crate::v2")
        .extern_path(
            ".apache.rocketmq.v2.ReceiveMessageResponse",
            "crate::consumed::ReceiveReply",
        )
        .extern_path(
            ".apache.rocketmq.v2.PullMessageResponse",
            "crate::consumed::PullReply",
        )
        .extern_path(
            ".apache.rocketmq.v2.AckMessageResponse",
            "crate::consumed::AckReply",
        )
        .compile_fds(messaging)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
