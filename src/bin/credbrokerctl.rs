//! `credbrokerctl`: the admin CLI (a gRPC client of the server). Thin: parse, dispatch, exit.

#![warn(clippy::too_many_lines)]

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = credbroker::cli::Cli::parse();
    std::process::exit(credbroker::cli::main(cli).await);
}
