//! `credbrokerctl caller …`: add, list and revoke callers.

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::format::*;
use super::{CallerCmd, Client, Output};
use crate::pb;

/// Runs one `caller` subcommand.
pub(super) async fn run(client: &mut Client, out: Output, cmd: CallerCmd) -> Result<()> {
    match cmd {
        CallerCmd::Add {
            name,
            role,
            systems,
            kinds,
            expires_at,
        } => {
            let role = match role.as_str() {
                "admin" => pb::CallerRole::Admin,
                "worker" => pb::CallerRole::Worker,
                other => bail!("--role must be admin or worker, not '{other}'"),
            };
            let resp = client
                .create_caller(pb::CreateCallerRequest {
                    name,
                    role: role as i32,
                    system_patterns: systems,
                    kinds: kinds
                        .iter()
                        .map(|k| {
                            parse_kind(k).map(|k| crate::server::convert::kind_to_proto(k) as i32)
                        })
                        .collect::<Result<Vec<_>>>()?,
                    expires_at: expires_at
                        .as_deref()
                        .map(parse_time)
                        .transpose()?
                        .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
                })
                .await?
                .into_inner();
            let c = resp.caller.unwrap_or_default();
            if out == Output::Json {
                println!(
                    "{}",
                    json!({"caller": caller_json(&c), "token": resp.token})
                );
            } else {
                println!("created caller {} ({})", c.name, role_name(c.role));
                println!("token (shown once): {}", resp.token);
            }
        }
        CallerCmd::List => {
            let resp = client
                .list_callers(pb::ListCallersRequest {})
                .await?
                .into_inner();
            if out == Output::Json {
                println!(
                    "{}",
                    Value::Array(resp.callers.iter().map(caller_json).collect())
                );
            } else {
                println!("{:<32} {:<8} {:<8} CREATED", "NAME", "ROLE", "REVOKED");
                for c in &resp.callers {
                    println!(
                        "{:<32} {:<8} {:<8} {}",
                        c.name,
                        role_name(c.role),
                        c.revoked,
                        c.created_at.as_ref().map(ts_string).unwrap_or_default()
                    );
                }
            }
        }
        CallerCmd::Revoke { name } => {
            let c = client
                .revoke_caller(pb::RevokeCallerRequest { name })
                .await?
                .into_inner()
                .caller
                .unwrap_or_default();
            if out == Output::Json {
                println!("{}", caller_json(&c));
            } else {
                println!("revoked caller {}", c.name);
            }
        }
    }
    Ok(())
}
