//! The audit trail: one structured event per RPC (and per OAuth callback), as JSON lines to a
//! size-rotated file and/or stdout.
//!
//! Events carry time, caller, RPC, system id, outcome and gRPC code, and the id of any token
//! handed out as an HMAC-SHA256 under a per-installation key derived from the master key (as
//! Vault's audit hashing does): correlatable, never reversible. No secret is ever written.
//!
//! When the sink cannot be written, secret-returning RPCs (`GetAccessToken`, `CreateCaller`) fail
//! closed unless `audit_fail_closed = false`, and health reports `NOT_SERVING` until a write
//! succeeds again.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::watch;

/// Default size at which the audit file is rotated.
pub const DEFAULT_MAX_BYTES: u64 = 100 * 1024 * 1024;
/// Default number of rotated files kept.
pub const DEFAULT_KEEP: usize = 5;

/// Where events go.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// JSON-lines file (rotated by size), if any.
    pub file: Option<PathBuf>,
    /// Also (or only) to stdout.
    pub stdout: bool,
    /// Rotate the file at this size.
    pub max_bytes: u64,
    /// Rotated files kept (`audit.log.1` … `.N`).
    pub keep: usize,
    /// Refuse secret-returning RPCs when the sink fails.
    pub fail_closed: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            file: None,
            stdout: false,
            max_bytes: DEFAULT_MAX_BYTES,
            keep: DEFAULT_KEEP,
            fail_closed: true,
        }
    }
}

/// One audit event.
#[derive(Debug, Serialize)]
pub struct AuditEvent<'a> {
    /// RFC 3339 UTC.
    pub time: String,
    /// The caller's name, when authenticated.
    pub caller: Option<&'a str>,
    /// The RPC (or `OAuthCallback`).
    pub rpc: &'a str,
    /// The system concerned.
    pub system_id: Option<&'a str>,
    /// `ok` or `error`.
    pub outcome: &'a str,
    /// The gRPC code name (`OK`, `PERMISSION_DENIED`, …).
    pub code: &'a str,
    /// HMAC of the token id handed out, if any.
    pub token_hmac: Option<String>,
    /// Proxied calls: the HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    /// Proxied calls: the path below the system, ids masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    /// Proxied calls: how long the call took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
}

/// Why an event could not be written.
#[derive(Debug, thiserror::Error)]
#[error("audit sink unavailable: {0}")]
pub struct AuditError(String);

struct FileSink {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    /// (device, inode) of the open file, to notice external rotation or removal.
    id: Option<(u64, u64)>,
}

#[cfg(unix)]
fn file_id(m: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_id(_: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

/// The audit writer.
pub struct Audit {
    config: AuditConfig,
    key: [u8; 32],
    file: Mutex<Option<FileSink>>,
    healthy: AtomicBool,
    health_tx: watch::Sender<bool>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// An audit writer with `key` for token HMACs.
    pub fn new(config: AuditConfig, key: [u8; 32]) -> Self {
        let file = config.file.clone().map(|path| FileSink {
            path,
            file: None,
            size: 0,
            id: None,
        });
        let (health_tx, _) = watch::channel(true);
        Self {
            config,
            key,
            file: Mutex::new(file),
            healthy: AtomicBool::new(true),
            health_tx,
        }
    }

    /// Whether secret-returning RPCs must fail when writing fails.
    pub fn fail_closed(&self) -> bool {
        self.config.fail_closed
    }

    /// True while the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// A receiver that sees health changes.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.health_tx.subscribe()
    }

    /// HMAC-SHA256 of `value` under the installation's audit key, hex (first 16 bytes).
    pub fn hmac(&self, value: &str) -> String {
        let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(&self.key) {
            Ok(m) => m,
            Err(_) => return String::new(),
        };
        mac.update(value.as_bytes());
        mac.finalize().into_bytes()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Writes one event to every sink.
    pub fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditError> {
        let mut line = serde_json::to_vec(event).map_err(|e| AuditError(e.to_string()))?;
        line.push(b'\n');
        let result = self.write_line(&line);
        let ok = result.is_ok();
        if !ok {
            crate::metrics::METRICS.audit_error();
        }
        if self.healthy.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!(message = "Audit sink recovered.");
            } else {
                tracing::error!(message = "Audit sink failed.", error = %result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
            }
            let _ = self.health_tx.send(ok);
        }
        result
    }

    fn write_line(&self, line: &[u8]) -> Result<(), AuditError> {
        if self.config.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(line)
                .and_then(|_| out.flush())
                .map_err(|e| AuditError(e.to_string()))?;
        }
        let mut guard = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sink) = guard.as_mut() else {
            return Ok(());
        };
        if sink.size + line.len() as u64 > self.config.max_bytes && sink.size > 0 {
            self.rotate(sink);
        }
        // Follow the path: after an external rotation, removal or replacement, reopen it.
        if sink.file.is_some() {
            let current = std::fs::metadata(&sink.path).ok().and_then(|m| file_id(&m));
            if current.is_none() || current != sink.id {
                sink.file = None;
            }
        }
        if sink.file.is_none() {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&sink.path)
                .map_err(|e| AuditError(e.to_string()))?;
            let meta = f.metadata().ok();
            sink.size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
            sink.id = std::fs::metadata(&sink.path)
                .ok()
                .and_then(|m| file_id(&m))
                .or_else(|| meta.as_ref().and_then(file_id));
            sink.file = Some(f);
        }
        let res = match sink.file.as_mut() {
            Some(f) => f.write_all(line).and_then(|_| f.flush()),
            None => Ok(()),
        };
        match res {
            Ok(()) => {
                sink.size += line.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Reopen next time: the file may have been replaced or the disk freed.
                sink.file = None;
                Err(AuditError(e.to_string()))
            }
        }
    }

    fn rotate(&self, sink: &mut FileSink) {
        sink.file = None;
        let name = |i: usize| {
            let mut p = sink.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        for i in (1..self.config.keep).rev() {
            let _ = std::fs::rename(name(i), name(i + 1));
        }
        if self.config.keep > 0 {
            let _ = std::fs::rename(&sink.path, name(1));
        } else {
            let _ = std::fs::remove_file(&sink.path);
        }
        sink.size = 0;
    }
}

/// RFC 3339 UTC time of now, with milliseconds.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, day) = civil(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

fn civil(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_rotates_and_hmacs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::new(
            AuditConfig {
                file: Some(path.clone()),
                max_bytes: 300,
                keep: 2,
                ..Default::default()
            },
            [7; 32],
        );
        let h = audit.hmac("token-123");
        assert_eq!(h.len(), 32);
        assert_ne!(
            h,
            Audit::new(AuditConfig::default(), [8; 32]).hmac("token-123")
        );
        for _ in 0..10 {
            audit
                .record(&AuditEvent {
                    time: now_rfc3339(),
                    caller: Some("w"),
                    rpc: "GetAccessToken",
                    system_id: Some("s"),
                    outcome: "ok",
                    code: "OK",
                    token_hmac: Some(h.clone()),
                    method: None,
                    path: None,
                    duration_ms: None,
                })
                .unwrap();
        }
        assert!(
            path.exists()
                && dir.path().join("audit.log.1").exists()
                && dir.path().join("audit.log.2").exists()
        );
        assert!(!dir.path().join("audit.log.3").exists());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        assert!(!text.contains("token-123"));
    }

    #[test]
    fn unwritable_sink_is_reported_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        #[cfg(unix)]
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let audit = Audit::new(
            AuditConfig {
                file: Some(path.clone()),
                ..Default::default()
            },
            [1; 32],
        );
        let ev = AuditEvent {
            time: now_rfc3339(),
            caller: None,
            rpc: "x",
            system_id: None,
            outcome: "ok",
            code: "OK",
            token_hmac: None,
            method: None,
            path: None,
            duration_ms: None,
        };
        assert!(audit.record(&ev).is_err());
        assert!(!audit.is_healthy());
        std::fs::remove_file(&path).unwrap();
        assert!(audit.record(&ev).is_ok());
        assert!(audit.is_healthy());
    }
}
