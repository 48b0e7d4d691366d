//! A system's recent past for its console page: the events this process holds in memory and
//! the tail of the audit file.

use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// How much of the audit file's end is read for a system's tail.
const TAIL_BYTES: u64 = 512 * 1024;

/// One audit line as the console shows it.
#[derive(Debug, Clone, Default)]
pub struct AuditLine {
    /// When.
    pub time: String,
    /// The RPC (or event).
    pub rpc: String,
    /// Who, when known.
    pub caller: String,
    /// The gRPC code name.
    pub code: String,
}

/// The newest `n` lines about `system_id` in the last [`TAIL_BYTES`] of the audit file, newest
/// first; `None` when there is no audit file (the trail goes to stdout) or it cannot be read.
pub async fn audit_tail(
    path: Option<PathBuf>,
    system_id: String,
    n: usize,
) -> Option<Vec<AuditLine>> {
    let path = path?;
    tokio::task::spawn_blocking(move || read_tail(&path, &system_id, n))
        .await
        .ok()
        .flatten()
}

fn read_tail(path: &std::path::Path, system_id: &str, n: usize) -> Option<Vec<AuditLine>> {
    let mut f = std::fs::File::open(path).ok()?;
    let len = f.metadata().ok()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    f.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    f.take(TAIL_BYTES).read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    // A tail that starts mid-line drops that partial first line.
    let lines = text.lines().skip(usize::from(start > 0));
    let mut out: Vec<AuditLine> = lines
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e["system_id"] == system_id)
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or("-").to_owned();
            let rpc = match e["event"].as_str() {
                Some(ev) => format!("{} ({ev})", s("rpc")),
                None => s("rpc"),
            };
            AuditLine {
                time: s("time"),
                rpc,
                caller: s("caller"),
                code: s("code"),
            }
        })
        .collect();
    out.reverse();
    out.truncate(n);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_one_systems_newest_lines_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let line = |i: usize, sys: &str| {
            format!("{{\"time\":\"t{i}\",\"caller\":\"admin\",\"rpc\":\"GetSystem\",\"system_id\":\"{sys}\",\"code\":\"OK\"}}\n")
        };
        let text: String = (0..30)
            .map(|i| line(i, if i % 2 == 0 { "a" } else { "b" }))
            .collect();
        std::fs::write(&path, text + "not json\n").unwrap();
        let tail = read_tail(&path, "a", 3).unwrap();
        let times: Vec<&str> = tail.iter().map(|l| l.time.as_str()).collect();
        assert_eq!(times, ["t28", "t26", "t24"]);
        assert!(read_tail(&dir.path().join("none"), "a", 3).is_none());
    }
}
