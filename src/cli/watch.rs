//! `credbrokerctl system watch` (live events) and `credbrokerctl system health` (one line per
//! system, worst first).

use anyhow::Result;
use serde_json::json;

use super::format::*;
use super::{Client, Output};
use crate::pb;

/// Streams events until interrupted (or the broker ends the watch).
pub(super) async fn watch(
    client: &mut Client,
    out: Output,
    system_ids: Vec<String>,
    kinds: Vec<String>,
    after: Option<String>,
) -> Result<()> {
    let kinds = kinds
        .iter()
        .map(|k| parse_kind(k).map(|k| crate::server::convert::kind_to_proto(k) as i32))
        .collect::<Result<Vec<_>>>()?;
    let mut stream = client
        .watch_systems(pb::WatchSystemsRequest {
            system_ids,
            kinds,
            after: after.unwrap_or_default(),
        })
        .await?
        .into_inner();
    while let Some(e) = stream.message().await? {
        print_event(out, &e);
    }
    Ok(())
}

fn print_event(out: Output, e: &pb::SystemEvent) {
    let sys = e.system.clone().unwrap_or_default();
    if out == Output::Json {
        println!(
            "{}",
            json!({
                "cursor": e.cursor,
                "type": e.r#type,
                "at": e.at.as_ref().map(ts_string),
                "detail": e.detail,
                "system": system_json(&sys),
            })
        );
        return;
    }
    println!(
        "{} {:<32} {:<30} {:<9} {}",
        e.at.as_ref().map(ts_string).unwrap_or_default(),
        sys.system_id,
        e.r#type,
        health_name(sys.health),
        e.detail
    );
}

/// Every system's health, worst first.
pub(super) async fn health(client: &mut Client, out: Output) -> Result<()> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let resp = client
            .list_systems(pb::ListSystemsRequest {
                page_size: 500,
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
    // FAILING (4) first, then DEGRADED, EXPIRING, HEALTHY; by id within each.
    all.sort_by(|a, b| b.health.cmp(&a.health).then(a.system_id.cmp(&b.system_id)));
    for s in &all {
        if out == Output::Json {
            println!(
                "{}",
                json!({
                    "system_id": s.system_id,
                    "kind": kind_name(s.kind),
                    "health": health_name(s.health),
                    "reason": s.health_reason,
                    "since": s.health_since.as_ref().map(ts_string),
                })
            );
        } else {
            println!(
                "{:<9} {:<32} {:<14} {}",
                health_name(s.health),
                s.system_id,
                kind_name(s.kind),
                s.health_reason
            );
        }
    }
    Ok(())
}
