//! `credbrokerctl key …`: rotate, inspect and retire the keys that wrap stored credentials.

use anyhow::Result;
use serde_json::json;

use super::{Client, KeyCmd, Output};
use crate::pb;

/// Runs one `key` subcommand.
pub(super) async fn run(client: &mut Client, out: Output, cmd: KeyCmd) -> Result<()> {
    match cmd {
        KeyCmd::Rotate => {
            let r = client
                .rotate_master_key(pb::RotateMasterKeyRequest {})
                .await?
                .into_inner();
            if out == Output::Json {
                println!("{}", json!({"key_id": r.key_id}));
            } else {
                println!(
                    "new primary key {}; records are being re-wrapped (see `key status`)",
                    r.key_id
                );
            }
        }
        KeyCmd::Status => {
            let s = client
                .get_key_status(pb::GetKeyStatusRequest {})
                .await?
                .into_inner();
            if out == Output::Json {
                println!(
                    "{}",
                    json!({
                        "primary_key_id": s.primary_key_id,
                        "rewrap_running": s.rewrap_running,
                        "records_total": s.records_total,
                        "records_on_primary": s.records_on_primary,
                        "keys": s.keys.iter().map(|k| json!({"key_id": k.key_id, "primary": k.primary, "root": k.root, "records": k.records})).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!(
                    "primary: {}  re-wrapped: {}/{}{}",
                    s.primary_key_id,
                    s.records_on_primary,
                    s.records_total,
                    if s.rewrap_running { " (running)" } else { "" }
                );
                for k in &s.keys {
                    println!(
                        "  {}  records {:>8}{}{}",
                        k.key_id,
                        k.records,
                        if k.primary { "  primary" } else { "" },
                        if k.root {
                            "  root (master key file)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        KeyCmd::Retire { key_id } => {
            client
                .retire_key(pb::RetireKeyRequest {
                    key_id: key_id.clone(),
                })
                .await?;
            if out == Output::Json {
                println!("{}", json!({"retired": key_id}));
            } else {
                println!("retired key {key_id}");
            }
        }
    }
    Ok(())
}
