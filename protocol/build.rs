//! Compiles the `.proto` files with `protox` (a protobuf compiler written in Rust), so no
//! system `protoc` is needed.

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
        .build_server(true)
        .generate_default_stubs(true)
        .codec_path("crate::codec::GrpcCodec")
        // Bodies stay in the buffer they arrived in instead of being copied out.
        .bytes(".apache.rocketmq.v2.Message.body")
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
