//! `credbrokerctl audit tail`: reads the server's audit file (no server connection needed).

use anyhow::{Context, Result};
use serde_json::Value;

use super::Output;

pub(super) fn audit_tail(
    path: &std::path::Path,
    system: Option<&str>,
    caller: Option<&str>,
    n: usize,
    out: Output,
) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the audit file {}", path.display()))?;
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| system.is_none_or(|s| e["system_id"] == s))
        .filter(|e| caller.is_none_or(|c| e["caller"] == c))
        .collect();
    for e in &events[events.len().saturating_sub(n)..] {
        if out == Output::Json {
            println!("{e}");
        } else {
            let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
            println!(
                "{} {:<20} {:<20} {:<24} {:<18} {}",
                s("time"),
                s("caller"),
                s("rpc"),
                s("system_id"),
                s("code"),
                s("token_hmac")
            );
        }
    }
    Ok(())
}
