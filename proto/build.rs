//! Compiles the duofleet.v1 contract with protox (pure Rust, no protoc) and
//! keeps the encoded descriptor set for gRPC server reflection.

use prost::Message;
use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "duofleet/v1/model.proto",
    "duofleet/v1/profile.proto",
    "duofleet/v1/fleet.proto",
    "duofleet/v1/history.proto",
    "duofleet/v1/agent.proto",
    "duofleet/v1/token.proto",
    "duofleet/v1/backup.proto",
    "duofleet/v1/config.proto",
    "duofleet/v1/rollout.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=duofleet");
    let fds = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("duofleet_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // AgentService's RPC is named Connect (a name operators and agents depend on), which clashes
        // with the generated `Client::connect` constructor: clients are made
        // with `Client::new(channel)` instead.
        .build_transport(false)
        .btree_map(".")
        // Messages that carry an API key get a redacting Debug (lib.rs).
        .skip_debug(["duofleet.v1.Model", "duofleet.v1.DesiredModel"])
        .compile_fds(fds)?;

    Ok(())
}
