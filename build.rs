//! Compiles `proto/` without a system `protoc`: `protox` (pure Rust) parses the files into a
//! `FileDescriptorSet`, `tonic-prost-build` generates the code from it, and the same set is
//! written to `OUT_DIR` for server reflection, so reflection always matches the code.

use std::path::PathBuf;

/// Messages that carry secrets get no derived `Debug`; `src/pb.rs` implements a redacting one.
const SECRET_MESSAGES: &[&str] = &[
    ".credbroker.v1.PersonalAccessToken",
    ".credbroker.v1.ApiKey",
    ".credbroker.v1.BasicCredential",
    ".credbroker.v1.OAuthClientCredentials",
    ".credbroker.v1.OAuthRefreshToken",
    ".credbroker.v1.OAuthPasswordGrant",
    ".credbroker.v1.SalesforceLogin",
    ".credbroker.v1.OAuthAuthorizationCode",
    ".credbroker.v1.EmailApiToken",
    ".credbroker.v1.EntraClientCredentials",
    ".credbroker.v1.SalesforceJwtBearer",
    ".credbroker.v1.HttpHeader",
    ".credbroker.v1.CreateCallerResponse",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/credbroker/v1/broker.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let descriptor_path = out_dir.join("credbroker_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .skip_debug(SECRET_MESSAGES.iter().copied())
        .compile_fds(fds)?;
    Ok(())
}
