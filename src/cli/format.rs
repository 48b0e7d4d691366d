//! Parsing of CLI values and rendering of answers (text tables and `--output json`).

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};

use super::Output;
use crate::model::SystemKind;
use crate::pb;

pub(super) fn parse_delivery(s: Option<&str>) -> Result<pb::Delivery> {
    match s {
        None => Ok(pb::Delivery::Unspecified),
        Some("header") => Ok(pb::Delivery::Header),
        Some("proxy") => Ok(pb::Delivery::Proxy),
        Some(other) => bail!("--delivery must be header or proxy, not '{other}'"),
    }
}

pub(super) fn delivery_name(v: i32) -> &'static str {
    match pb::Delivery::try_from(v) {
        Ok(pb::Delivery::Header) => "header",
        Ok(pb::Delivery::Proxy) => "proxy",
        _ => "default",
    }
}

pub(super) fn parse_kind(s: &str) -> Result<SystemKind> {
    SystemKind::from_slug(s).ok_or_else(|| {
        let all: Vec<String> = SystemKind::ALL
            .iter()
            .map(|k| k.slug().replace('_', "-"))
            .collect();
        anyhow!("unknown kind '{s}'; one of: {}", all.join(", "))
    })
}

pub(super) fn kind_from_proto(v: i32) -> Result<SystemKind> {
    crate::server::convert::kind(v, "kind").map_err(|e| anyhow!("{e}"))
}

/// Parses `YYYY-MM-DD`, `YYYY-MM-DDTHH:MM:SSZ` or Unix seconds.
pub fn parse_time(s: &str) -> Result<i64> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i64>() {
        return Ok(n);
    }
    let bad = || anyhow!("'{s}' is not YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or Unix seconds");
    let (date, time) = match s.split_once('T') {
        Some((d, t)) => (d, Some(t.trim_end_matches('Z'))),
        None => (s, None),
    };
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = match (d.next(), d.next(), d.next(), d.next()) {
        (Some(Ok(y)), Some(Ok(m)), Some(Ok(dd)), None) => (y, m, dd),
        _ => return Err(bad()),
    };
    let leap = y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let month_days = match m {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    // Years past 9999 would overflow the arithmetic below; February 31st is no date.
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=month_days).contains(&day) {
        return Err(bad());
    }
    let mut secs = crate::util::time::days_from_civil(y, m, day) * 86_400;
    if let Some(t) = time {
        let parts: Vec<i64> = t
            .split(':')
            .map(|p| p.parse::<i64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad())?;
        match parts.as_slice() {
            [h, mi, se] if (0..24).contains(h) && (0..60).contains(mi) && (0..61).contains(se) => {
                secs += h * 3600 + mi * 60 + se
            }
            _ => return Err(bad()),
        }
    }
    Ok(secs)
}

/// RFC 3339 (UTC) rendering of a timestamp.
pub fn ts_string(t: &prost_types::Timestamp) -> String {
    let days = t.seconds.div_euclid(86_400);
    let rem = t.seconds.rem_euclid(86_400);
    let (y, m, d) = crate::util::time::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

pub(super) fn kind_name(v: i32) -> String {
    kind_from_proto(v)
        .map(|k| k.slug().replace('_', "-"))
        .unwrap_or_else(|_| "unknown".to_owned())
}

pub(super) fn state_name(v: i32) -> &'static str {
    match pb::SystemState::try_from(v) {
        Ok(pb::SystemState::Active) => "active",
        Ok(pb::SystemState::AuthorizationPending) => "authorization_pending",
        Ok(pb::SystemState::ReauthorizationRequired) => "reauthorization_required",
        _ => "unknown",
    }
}

pub(super) fn health_name(v: i32) -> String {
    short_name(
        pb::SystemHealth::try_from(v).map(|h| h.as_str_name()),
        "SYSTEM_HEALTH_",
    )
}

pub(super) fn role_name(v: i32) -> &'static str {
    match pb::CallerRole::try_from(v) {
        Ok(pb::CallerRole::Admin) => "admin",
        Ok(pb::CallerRole::Worker) => "worker",
        _ => "unknown",
    }
}

pub(super) fn failure_name(v: i32) -> String {
    short_name(
        pb::AuthFailure::try_from(v).map(|f| f.as_str_name()),
        "AUTH_FAILURE_",
    )
}

pub(super) fn cred_type_name(v: i32) -> String {
    short_name(
        pb::CredentialType::try_from(v).map(|f| f.as_str_name()),
        "CREDENTIAL_TYPE_",
    )
}

/// A proto enum value's name without its type prefix, in lower case (`unknown` if out of range).
fn short_name<E>(name: Result<&str, E>, prefix: &str) -> String {
    name.map(|n| n.trim_start_matches(prefix).to_ascii_lowercase())
        .unwrap_or_else(|_| "unknown".to_owned())
}

pub(super) fn check_json(c: &pb::AuthCheck) -> Value {
    json!({
        "ok": c.ok,
        "failure": if c.ok { Value::Null } else { Value::String(failure_name(c.failure)) },
        "message": c.message,
        "identity": c.identity.as_ref().map(|i| json!({"id": i.id, "display_name": i.display_name, "email": i.email})),
        "missing_permissions": c.missing_permissions,
        "checked_at": c.checked_at.as_ref().map(ts_string),
    })
}

pub(super) fn system_json(s: &pb::System) -> Value {
    json!({
        "system_id": s.system_id,
        "display_name": s.display_name,
        "description": s.description,
        "kind": kind_name(s.kind),
        "base_url": s.base_url,
        "credential_type": cred_type_name(s.credential_type),
        "credential_version": s.credential_version,
        "state": state_name(s.state),
        "state_message": s.state_message,
        "delivery": delivery_name(s.delivery),
        "proxy_unauthorized_count": s.proxy_unauthorized_count,
        "created_at": s.created_at.as_ref().map(ts_string),
        "updated_at": s.updated_at.as_ref().map(ts_string),
        "credential_expires_at": s.credential_expires_at.as_ref().map(ts_string),
        "last_check": s.last_check.as_ref().map(check_json),
        "health": health_name(s.health),
        "health_reason": s.health_reason,
        "health_since": s.health_since.as_ref().map(ts_string),
        "quota": s.quota.as_ref().map(|q| json!({
            "remaining": (q.remaining >= 0).then_some(q.remaining),
            "limit": (q.limit >= 0).then_some(q.limit),
            "reset_at": q.reset_at.as_ref().map(ts_string),
            "blocked_until": q.blocked_until.as_ref().map(ts_string),
            "in_flight": q.in_flight,
        })),
    })
}

/// `quota: 450 of 1000 left, 3 in flight, blocked until …` (what the vendor reports).
fn quota_line(q: &pb::UpstreamQuota) -> String {
    let mut parts = Vec::new();
    match (q.remaining, q.limit) {
        (r, l) if r >= 0 && l >= 0 => parts.push(format!("{r} of {l} left")),
        (r, _) if r >= 0 => parts.push(format!("{r} left")),
        (_, l) if l >= 0 => parts.push(format!("limit {l}")),
        _ => {}
    }
    if let Some(at) = &q.reset_at {
        parts.push(format!("resets {}", ts_string(at)));
    }
    parts.push(format!("{} in flight", q.in_flight));
    if let Some(until) = &q.blocked_until {
        parts.push(format!("held back until {}", ts_string(until)));
    }
    parts.join(", ")
}

pub(super) fn caller_json(c: &pb::Caller) -> Value {
    json!({
        "name": c.name,
        "role": role_name(c.role),
        "revoked": c.revoked,
        "created_at": c.created_at.as_ref().map(ts_string),
        "system_patterns": c.system_patterns,
        "kinds": c.kinds.iter().map(|k| kind_name(*k)).collect::<Vec<_>>(),
        "expires_at": c.expires_at.as_ref().map(ts_string),
    })
}

pub(super) fn print_check(c: &pb::AuthCheck) {
    if c.ok {
        println!("check: ok");
    } else {
        println!("check: FAILED ({})", failure_name(c.failure));
    }
    if let Some(i) = &c.identity {
        println!("identity: {} ({}) <{}>", i.display_name, i.id, i.email);
    }
    if !c.missing_permissions.is_empty() {
        println!("missing permissions: {}", c.missing_permissions.join(", "));
    }
    if !c.message.is_empty() {
        println!("message: {}", c.message);
    }
}

pub(super) fn print_system(out: Output, s: &pb::System, check: Option<&pb::AuthCheck>, verb: &str) {
    if out == Output::Json {
        let mut v = system_json(s);
        if let (Some(c), Some(obj)) = (check, v.as_object_mut()) {
            obj.insert("check".to_owned(), check_json(c));
        }
        println!("{v}");
        return;
    }
    if !verb.is_empty() {
        println!("{verb} {}", s.system_id);
    }
    println!("id: {}", s.system_id);
    if !s.display_name.is_empty() {
        println!("name: {}", s.display_name);
    }
    println!("kind: {}", kind_name(s.kind));
    println!("base_url: {}", s.base_url);
    println!(
        "credential: {} (version {})",
        cred_type_name(s.credential_type),
        s.credential_version
    );
    println!("state: {}", state_name(s.state));
    println!("delivery: {}", delivery_name(s.delivery));
    if s.proxy_unauthorized_count > 0 {
        println!(
            "vendor 401s through the proxy: {} (last {})",
            s.proxy_unauthorized_count,
            s.last_proxy_unauthorized_at
                .as_ref()
                .map(ts_string)
                .unwrap_or_default()
        );
    }
    if !s.state_message.is_empty() {
        println!("state_message: {}", s.state_message);
    }
    if s.health_reason.is_empty() {
        println!("health: {}", health_name(s.health));
    } else {
        println!("health: {} ({})", health_name(s.health), s.health_reason);
    }
    if let Some(e) = &s.credential_expires_at {
        println!("credential_expires_at: {}", ts_string(e));
    }
    if let Some(q) = &s.quota {
        println!("vendor quota: {}", quota_line(q));
    }
    if let Some(c) = check {
        print_check(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_parsing_round_trips() {
        let t = parse_time("2027-01-31").unwrap();
        assert_eq!(
            ts_string(&prost_types::Timestamp {
                seconds: t,
                nanos: 0
            }),
            "2027-01-31T00:00:00Z"
        );
        let t = parse_time("2026-11-23T15:04:05Z").unwrap();
        assert_eq!(
            ts_string(&prost_types::Timestamp {
                seconds: t,
                nanos: 0
            }),
            "2026-11-23T15:04:05Z"
        );
        assert_eq!(parse_time("0").unwrap(), 0);
        assert!(parse_time("2027-13-01").is_err());
        // No impossible day, no year the arithmetic cannot hold, no negative time.
        for bad in [
            "2027-02-29",
            "2026-04-31",
            "99999999999999-01-01",
            "0001-01-01",
            "2027-01-01T-1:00:00Z",
            "2027-01-01T00:-5:00Z",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_time("2028-02-29").unwrap(),
            parse_time("2028-03-01").unwrap() - 86_400
        );
        assert!(parse_time("soon").is_err());
    }
}
