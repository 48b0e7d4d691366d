//! `credbrokerctl system …`: register, list, show, check, rotate, switch delivery, connect and
//! delete systems.

use anyhow::{bail, Result};
use serde_json::{json, Value};

use super::format::*;
use super::secrets::build_credential;
use super::{Client, CredentialArgs, Output, RegisterArgs, SystemCmd};
use crate::pb;

/// Runs one `system` subcommand.
pub(super) async fn run(client: &mut Client, out: Output, cmd: SystemCmd) -> Result<()> {
    match cmd {
        SystemCmd::Register(a) => register(client, out, a).await?,
        SystemCmd::List { page_size } => list(client, out, page_size).await?,
        SystemCmd::Show { system_id } => {
            let sys = fetch_system(client, &system_id).await?;
            print_system(out, &sys, sys.last_check.as_ref(), "");
        }
        SystemCmd::Check {
            system_id,
            kind,
            base_url,
            credential,
        } => check(client, out, system_id, kind, base_url, credential).await?,
        SystemCmd::Rotate {
            system_id,
            skip_check,
            credential,
        } => rotate(client, out, system_id, skip_check, credential).await?,
        SystemCmd::SetDelivery {
            system_id,
            delivery,
        } => {
            let d = if delivery == "default" {
                pb::Delivery::Unspecified
            } else {
                parse_delivery(Some(&delivery))?
            };
            let sys = client
                .set_delivery(pb::SetDeliveryRequest {
                    system_id,
                    delivery: d as i32,
                })
                .await?
                .into_inner()
                .system
                .unwrap_or_default();
            print_system(out, &sys, None, "updated");
        }
        SystemCmd::Watch {
            system_ids,
            kinds,
            after,
        } => super::watch::watch(client, out, system_ids, kinds, after).await?,
        SystemCmd::Health => super::watch::health(client, out).await?,
        SystemCmd::Connect { system_id, poll_ms } => {
            connect_system(client, out, system_id, poll_ms).await?;
        }
        SystemCmd::Delete { system_id } => {
            client
                .delete_system(pb::DeleteSystemRequest {
                    system_id: system_id.clone(),
                })
                .await?;
            if out == Output::Json {
                println!("{}", json!({"deleted": system_id}));
            } else {
                println!("deleted {system_id}");
            }
        }
    }
    Ok(())
}

async fn register(client: &mut Client, out: Output, a: RegisterArgs) -> Result<()> {
    let kind = parse_kind(&a.kind)?;
    let credential = build_credential(kind, &a.credential)?;
    let resp = client
        .register_system(pb::RegisterSystemRequest {
            system_id: a.system_id,
            display_name: a.name,
            description: a.description,
            kind: crate::server::convert::kind_to_proto(kind) as i32,
            base_url: a.base_url,
            credential: Some(credential),
            check: a.check,
            delivery: parse_delivery(a.delivery.as_deref())? as i32,
        })
        .await?
        .into_inner();
    let sys = resp.system.unwrap_or_default();
    print_system(out, &sys, resp.check.as_ref(), "registered");
    Ok(())
}

async fn list(client: &mut Client, out: Output, page_size: u32) -> Result<()> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = client
            .list_systems(pb::ListSystemsRequest {
                page_size,
                page_token: page_token.clone(),
            })
            .await?
            .into_inner();
        all.extend(resp.systems);
        if resp.next_page_token.is_empty() {
            break;
        }
        page_token = resp.next_page_token;
    }
    if out == Output::Json {
        println!("{}", Value::Array(all.iter().map(system_json).collect()));
    } else if all.is_empty() {
        println!("no systems");
    } else {
        println!(
            "{:<32} {:<14} {:<8} {:<26} BASE URL",
            "ID", "KIND", "VERSION", "STATE"
        );
        for s in &all {
            println!(
                "{:<32} {:<14} {:<8} {:<26} {}",
                s.system_id,
                kind_name(s.kind),
                s.credential_version,
                state_name(s.state),
                s.base_url
            );
        }
    }
    Ok(())
}

async fn check(
    client: &mut Client,
    out: Output,
    system_id: Option<String>,
    kind: Option<String>,
    base_url: String,
    credential: CredentialArgs,
) -> Result<()> {
    use pb::check_authentication_request::Target;
    let target = match (system_id, kind) {
        (Some(id), None) => Target::SystemId(id),
        (None, Some(k)) => {
            let kind = parse_kind(&k)?;
            Target::Candidate(pb::CandidateSystem {
                kind: crate::server::convert::kind_to_proto(kind) as i32,
                base_url,
                credential: Some(build_credential(kind, &credential)?),
            })
        }
        _ => bail!("give either a SYSTEM_ID or --kind (with a candidate credential)"),
    };
    let check = client
        .check_authentication(pb::CheckAuthenticationRequest {
            target: Some(target),
        })
        .await?
        .into_inner()
        .check
        .unwrap_or_default();
    if out == Output::Json {
        println!("{}", check_json(&check));
    } else {
        print_check(&check);
    }
    if !check.ok {
        bail!("the check failed");
    }
    Ok(())
}

async fn rotate(
    client: &mut Client,
    out: Output,
    system_id: String,
    skip_check: bool,
    credential: CredentialArgs,
) -> Result<()> {
    let current = fetch_system(client, &system_id).await?;
    let kind = kind_from_proto(current.kind)?;
    let credential = build_credential(kind, &credential)?;
    let resp = client
        .rotate_credential(pb::RotateCredentialRequest {
            system_id,
            credential: Some(credential),
            skip_check,
        })
        .await?
        .into_inner();
    print_system(
        out,
        &resp.system.unwrap_or_default(),
        resp.check.as_ref(),
        "rotated",
    );
    Ok(())
}

async fn connect_system(
    client: &mut Client,
    out: Output,
    system_id: String,
    poll_ms: u64,
) -> Result<()> {
    let before = fetch_system(client, &system_id).await?;
    let start = client
        .start_authorization(pb::StartAuthorizationRequest {
            system_id: system_id.clone(),
        })
        .await?
        .into_inner();
    let expires = start.expires_at.unwrap_or_default();
    if out == Output::Json {
        println!(
            "{}",
            json!({"authorize_url": start.authorize_url, "redirect_uri": start.redirect_uri, "expires_at": ts_string(&expires)})
        );
    } else {
        println!(
            "Open this URL in a browser, sign in and allow access:\n\n  {}\n",
            start.authorize_url
        );
        println!("(The vendor sends the browser back to {}; it must be registered with the OAuth client.)", start.redirect_uri);
    }
    use std::io::Write;
    let mut last_message = before.state_message.clone();
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(poll_ms.max(50))).await;
        let sys = fetch_system(client, &system_id).await?;
        if sys.state == pb::SystemState::Active as i32
            && sys.credential_version > before.credential_version
        {
            if out == Output::Json {
                println!("{}", system_json(&sys));
            } else {
                eprintln!();
                println!(
                    "connected: {} is active (credential version {})",
                    sys.system_id, sys.credential_version
                );
            }
            return Ok(());
        }
        if sys.state_message != last_message && !sys.state_message.is_empty() {
            eprintln!("\n{}", sys.state_message);
            last_message = sys.state_message.clone();
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let left = expires.seconds - now;
        if left <= 0 {
            bail!("the authorization expired before it was completed; run `credbrokerctl system connect {system_id}` again");
        }
        if out == Output::Text {
            eprint!(
                "\rwaiting for the authorization… {:02}:{:02} left ",
                left / 60,
                left % 60
            );
            let _ = std::io::stderr().flush();
        }
    }
}

/// The system `system_id` as the server shows it (metadata only).
async fn fetch_system(client: &mut Client, system_id: &str) -> Result<pb::System> {
    Ok(client
        .get_system(pb::GetSystemRequest {
            system_id: system_id.to_owned(),
        })
        .await?
        .into_inner()
        .system
        .unwrap_or_default())
}
