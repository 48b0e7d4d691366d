//! `credbrokerctl token get`: what a worker gets.

use anyhow::Result;
use serde_json::json;

use super::format::ts_string;
use super::{Client, Output, TokenCmd};
use crate::pb;

/// Runs `token get`.
pub(super) async fn run(client: &mut Client, out: Output, cmd: TokenCmd) -> Result<()> {
    let TokenCmd::Get {
        system_id,
        min_valid_seconds,
        rejected_token_id,
    } = cmd;
    let t = client
        .get_access_token(pb::GetAccessTokenRequest {
            system_id,
            min_valid_seconds,
            rejected_token_id,
        })
        .await?
        .into_inner();
    if out == Output::Json {
        println!(
            "{}",
            json!({
                "headers": t.headers.iter().map(|h| json!({"name": h.name, "value": h.value})).collect::<Vec<_>>(),
                "expires_at": t.expires_at.as_ref().map(ts_string),
                "api_base_url": t.api_base_url,
                "credential_version": t.credential_version,
                "token_id": t.token_id,
            })
        );
    } else {
        for h in &t.headers {
            println!("{}: {}", h.name, h.value);
        }
        println!("api_base_url: {}", t.api_base_url);
        println!(
            "expires_at: {}",
            t.expires_at.as_ref().map(ts_string).unwrap_or_default()
        );
        println!("credential_version: {}", t.credential_version);
        println!("token_id: {}", t.token_id);
    }
    Ok(())
}
