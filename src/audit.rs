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
//!
//! Writes are group-committed: an event joins the open batch, the first event of a batch leads it
//! (it lets the other calls of the same scheduler tick add theirs, then writes the whole batch with
//! one `write`), and every call waits until the batch holding its event has been written, so an
//! RPC still answers only after its audit line is in the file, and still fails closed when it is
//! not. Under load this turns one `stat` + one `write` per call into one per batch.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};

use hmac::{Hmac, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{watch, Notify};

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
    pub time: Timestamp,
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
    pub token_hmac: Option<&'a str>,
    /// Proxied calls: the HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    /// Proxied calls: the path below the system, ids masked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    /// Proxied calls: how long the call took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// System events (`rpc` = `SystemEvent`): the event type, as `WatchSystems` names it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event: Option<&'a str>,
    /// What an administrative call changed, beyond a system (`caller=NAME role=ROLE`, `key=ID`,
    /// `delivery=proxy`): no secrets, only names the broker validated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

impl<'a> AuditEvent<'a> {
    /// An event of `rpc` now, with its outcome and code and no other field.
    pub fn now(rpc: &'a str, outcome: &'a str, code: &'a str) -> Self {
        Self {
            time: now_rfc3339(),
            caller: None,
            rpc,
            system_id: None,
            outcome,
            code,
            token_hmac: None,
            method: None,
            path: None,
            duration_ms: None,
            event: None,
            detail: None,
        }
    }
}

/// Why an event could not be written.
#[derive(Debug, Clone, thiserror::Error)]
#[error("audit sink unavailable: {0}")]
pub struct AuditError(String);

/// The outcome of one batch, shared by every call whose event is in it.
#[derive(Default)]
struct Written {
    result: OnceLock<Result<(), AuditError>>,
    notify: Notify,
}

impl Written {
    async fn wait(&self) -> Result<(), AuditError> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.result.get() {
                return r.clone();
            }
            notified.await;
        }
    }
}

/// The batch being filled.
#[derive(Default)]
struct Pending {
    lines: Vec<u8>,
    events: u64,
    /// A call has taken the lead for this batch and will write it.
    led: bool,
    written: Arc<Written>,
}

/// Writes the open batch when dropped: the leader's future may be cancelled (a client that goes
/// away) and the other calls of its batch must not wait forever.
struct Leader<'a>(&'a Audit);

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        self.0.flush();
    }
}

struct FileSink {
    path: PathBuf,
    file: Option<File>,
    size: u64,
    /// (device, inode) of the open file, to notice external rotation or removal.
    id: Option<(u64, u64)>,
    /// The file's last line is unended (cut short by a crash or a failed write).
    torn: bool,
}

/// Whether the last byte (of `size`) of the file at `path` ends a line; true when it cannot
/// be read (the trail may be writable only, and is written on regardless).
fn ends_a_line(path: &std::path::Path, size: u64) -> bool {
    use std::os::unix::fs::FileExt;
    let mut last = [0u8; 1];
    match File::open(path).and_then(|f| f.read_at(&mut last, size.saturating_sub(1))) {
        Ok(1) => last[0] == b'\n',
        _ => true,
    }
}

/// Opens the trail for appending, created owner-only.
fn open_trail(path: &std::path::Path) -> std::io::Result<File> {
    std::os::unix::fs::OpenOptionsExt::mode(OpenOptions::new().create(true).append(true), 0o600)
        .open(path)
}

/// Cuts the last `written` bytes off `f`, if it still has that many (best effort).
fn take_back(f: &File, written: u64) {
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if written > 0 && len >= written {
        let _ = f.set_len(len - written);
    }
}

/// Appends `parts` to `f` (opened to append); how many bytes reached it, and whether all did.
fn append(f: &mut File, parts: &[&[u8]]) -> (u64, std::io::Result<()>) {
    let mut written = 0u64;
    for part in parts {
        let mut rest = *part;
        while !rest.is_empty() {
            match f.write(rest) {
                Ok(0) => return (written, Err(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    written += n as u64;
                    rest = &rest[n..];
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return (written, Err(e)),
            }
        }
    }
    (written, f.flush())
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
    /// HMAC-SHA256 keyed once; cloned per token.
    mac: Option<Hmac<Sha256>>,
    file: Mutex<Option<FileSink>>,
    pending: Mutex<Pending>,
    /// Batches written (each one `write` per sink).
    batches: std::sync::atomic::AtomicU64,
    /// Whether the last write succeeded (and who wants to know when that changes).
    health_tx: watch::Sender<bool>,
    /// Lines for refused and unauthenticated calls in the current second: (second, count).
    refusals: std::sync::Mutex<(u64, u32)>,
    /// While the sink fails: when [`Audit::recheck`] may try it next, and the wait after that.
    rechecks: std::sync::Mutex<Option<(std::time::Instant, std::time::Duration)>>,
}

/// The first wait between two [`Audit::recheck`] tries of a failing sink; it doubles up to
/// [`RECHECK_MAX`], so a sink failing for hours (a file gone, stdout still written) gets a try
/// every 15 s, not a line a second, and a freed disk is found within 15 s.
const RECHECK_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest wait between two tries.
const RECHECK_MAX: std::time::Duration = std::time::Duration::from_secs(15);

/// Lines a second kept for refused and unauthenticated calls; the rest are counted in
/// `credbroker_audit_dropped_total`, so anonymous traffic cannot rotate the trail away.
pub const MAX_REFUSAL_LINES_PER_SEC: u32 = 50;

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Audit {
    /// An audit writer with `key` for token HMACs.
    pub fn new(config: AuditConfig, key: crate::crypto::SubKey) -> Self {
        let file = config.file.clone().map(|path| FileSink {
            path,
            file: None,
            size: 0,
            id: None,
            torn: false,
        });
        let (health_tx, _) = watch::channel(true);
        Self {
            config,
            mac: <Hmac<Sha256> as Mac>::new_from_slice(key.as_bytes()).ok(),
            file: Mutex::new(file),
            pending: Mutex::new(Pending::default()),
            batches: std::sync::atomic::AtomicU64::new(0),
            refusals: std::sync::Mutex::new((0, 0)),
            rechecks: std::sync::Mutex::new(None),
            health_tx,
        }
    }

    /// The audit file, when the trail is written to one.
    pub fn file_path(&self) -> Option<&std::path::Path> {
        self.config.file.as_deref()
    }

    /// Whether a line for a refused or unauthenticated call may be written now (at most
    /// [`MAX_REFUSAL_LINES_PER_SEC`] a second); a dropped one is counted.
    pub fn admit_refusal(&self) -> bool {
        let now = crate::model::unix_now();
        let mut r = crate::util::sync::lock(&self.refusals);
        if r.0 != now {
            *r = (now, 0);
        }
        r.1 += 1;
        let admitted = r.1 <= MAX_REFUSAL_LINES_PER_SEC;
        if !admitted {
            crate::metrics::METRICS.audit_dropped();
        }
        admitted
    }

    /// Whether secret-returning RPCs must fail when writing fails.
    pub fn fail_closed(&self) -> bool {
        self.config.fail_closed
    }

    /// True while the last write succeeded.
    pub fn is_healthy(&self) -> bool {
        *self.health_tx.borrow()
    }

    /// How many batches have been written so far.
    pub fn batches_written(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// A receiver that sees health changes.
    pub fn health(&self) -> watch::Receiver<bool> {
        self.health_tx.subscribe()
    }

    /// HMAC-SHA256 of `value` under the installation's audit key, hex (first 16 bytes).
    pub fn hmac(&self, value: &str) -> String {
        let Some(mut mac) = self.mac.clone() else {
            return String::new();
        };
        mac.update(value.as_bytes());
        crate::util::hex::encode(&mac.finalize().into_bytes()[..16])
    }

    /// Writes one event to every sink; the future resolves once the batch holding it has been
    /// written. The event joins its batch right away (so the future holds only a few pointers,
    /// not the event); the first call of a batch leads it, and its future writes the batch when
    /// polled after one scheduler yield, or when dropped.
    pub fn record<'s>(
        &'s self,
        event: &AuditEvent<'_>,
    ) -> impl Future<Output = Result<(), AuditError>> + Send + 's {
        let joined = {
            let mut p = crate::util::sync::lock(&self.pending);
            // Serialized straight into the batch; a failed event leaves no partial line.
            let start = p.lines.len();
            match serde_json::to_writer(&mut p.lines, event) {
                Err(e) => {
                    p.lines.truncate(start);
                    Err(AuditError(e.to_string()))
                }
                Ok(()) => {
                    p.lines.push(b'\n');
                    p.events += 1;
                    let lead = !std::mem::replace(&mut p.led, true);
                    // Not `then_some`: a `Leader` built and dropped here would write the batch
                    // under this lock.
                    Ok((p.written.clone(), lead.then(|| Leader(self))))
                }
            }
        };
        async move {
            let (written, leader) = joined?;
            if let Some(leader) = leader {
                // Let the calls that are ready in this tick join the batch, then write it.
                tokio::task::yield_now().await;
                drop(leader);
            }
            written.wait().await
        }
    }

    /// While the sink is failing, tries it again with a line of its own, whose success makes
    /// the broker healthy again. Without it a failed trail was tried only by calls, and once a
    /// load balancer had taken the broker out of service for it, none came: it stayed unready
    /// after the disk was freed. Does nothing while the sink is healthy; while it fails, tries
    /// at once, then after 1 s, 2 s, … and every 15 s at most.
    pub async fn recheck(&self) {
        if !self.recheck_due() {
            return;
        }
        let line = AuditEvent {
            detail: Some("a check of the trail, which could not be written before"),
            ..AuditEvent::now("AuditCheck", "ok", "OK")
        };
        let _ = self.record(&line).await;
    }

    /// Whether [`Self::recheck`] should try the sink now (and when it may next).
    fn recheck_due(&self) -> bool {
        let mut next = crate::util::sync::lock(&self.rechecks);
        if self.is_healthy() {
            *next = None;
            return false;
        }
        let now = std::time::Instant::now();
        let (at, wait) = next.get_or_insert((now, RECHECK_FIRST));
        if now < *at {
            return false;
        }
        *at = now + *wait;
        *wait = (*wait * 2).min(RECHECK_MAX);
        true
    }

    /// At start: opens the audit file as a write would, so a trail that cannot be opened (a
    /// missing directory, no permission, a directory in its place) is reported before the
    /// first call, not at it.
    pub fn check_at_start(&self) {
        let Some(path) = self.config.file.as_deref() else {
            return;
        };
        if let Err(e) = open_trail(path) {
            self.health_tx.send_replace(false);
            tracing::error!(message = "Audit sink failed.", error = %e);
        }
    }

    /// Writes the open batch (called by its leader). Batches reach the file in the order they
    /// were closed: the file lock is taken before the batch is.
    fn flush(&self) {
        let mut file = crate::util::sync::lock(&self.file);
        let (lines, events, written) = {
            let mut p = crate::util::sync::lock(&self.pending);
            // The next batch starts with room for one like this (one allocation, not a dozen
            // while it grows).
            let room = Vec::with_capacity(p.lines.len().min(1 << 20));
            let taken = std::mem::replace(
                &mut *p,
                Pending {
                    lines: room,
                    ..Pending::default()
                },
            );
            (taken.lines, taken.events, taken.written)
        };
        if lines.is_empty() {
            let _ = written.result.set(Ok(()));
            written.notify.notify_waiters();
            return;
        }
        let result = self.write_batch(&mut file, &lines);
        drop(file);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let ok = result.is_ok();
        if !ok {
            for _ in 0..events {
                crate::metrics::METRICS.audit_error();
            }
        }
        let changed = self.health_tx.send_if_modified(|healthy| {
            let changed = *healthy != ok;
            *healthy = ok;
            changed
        });
        if changed {
            if ok {
                tracing::info!(message = "Audit sink recovered.");
            } else {
                tracing::error!(message = "Audit sink failed.", error = %result.as_ref().err().map(|e| e.to_string()).unwrap_or_default());
            }
        }
        let _ = written.result.set(result);
        written.notify.notify_waiters();
    }

    fn write_batch(&self, guard: &mut Option<FileSink>, line: &[u8]) -> Result<(), AuditError> {
        if self.config.stdout {
            let mut out = std::io::stdout().lock();
            out.write_all(line)
                .and_then(|_| out.flush())
                .map_err(|e| AuditError(e.to_string()))?;
        }
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
            let f = open_trail(&sink.path).map_err(|e| AuditError(e.to_string()))?;
            let meta = f.metadata().ok();
            sink.size = meta.as_ref().map(|m| m.len()).unwrap_or(0);
            sink.torn = sink.size > 0 && !ends_a_line(&sink.path, sink.size);
            sink.id = std::fs::metadata(&sink.path)
                .ok()
                .and_then(|m| file_id(&m))
                .or_else(|| meta.as_ref().and_then(file_id));
            sink.file = Some(f);
        }
        // A line cut short before (a crash mid-write) is ended first, so the next one stands
        // on its own line.
        let start: &[u8] = if sink.torn { b"\n" } else { b"" };
        let Some(f) = sink.file.as_mut() else {
            return Ok(());
        };
        let (written, res) = append(f, &[start, line]);
        match res {
            Ok(()) => {
                sink.size += written;
                sink.torn = false;
                Ok(())
            }
            Err(e) => {
                // The part of the batch that reached the file is cut off again (a full disk
                // takes a line's head and refuses its tail), else the next batch's first line
                // would be glued to it: the file shrinks by exactly those bytes, from its end
                // as it is now (a copy-truncate rotation may have emptied it meanwhile), never
                // grows. If that fails too, the reopen finds the line unended. Reopened next
                // time: the file may have been replaced or the disk freed.
                if let Some(f) = sink.file.take() {
                    take_back(&f, written);
                }
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

/// An RFC 3339 UTC time with milliseconds (`2026-11-23T21:16:57.123Z`), formatted on the stack:
/// every audit event carries one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Timestamp([u8; 24]);

impl Timestamp {
    /// The text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators are ever written.
        std::str::from_utf8(&self.0).unwrap_or("1970-01-01T00:00:00.000Z")
    }
}

impl std::fmt::Display for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// RFC 3339 UTC time of now, with milliseconds.
pub fn now_rfc3339() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_millis())
}

pub(crate) fn rfc3339(secs: i64, millis: u32) -> Timestamp {
    // Four digits of year: 1970 to 9999 (a time someone wrote far off is shown at the bound).
    let secs = secs.clamp(0, 253_402_300_799);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, day) = crate::util::time::civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut v: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v.rem_euclid(10)) as u8;
            v /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, m);
    put(8, 2, day);
    put(11, 2, rem / 3600);
    put(14, 2, (rem / 60) % 60);
    put(17, 2, rem % 60);
    put(20, 3, i64::from(millis));
    Timestamp(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0, 0).as_str(), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(1_795_468_617, 123).as_str(),
            "2026-11-23T21:16:57.123Z"
        );
        assert_eq!(
            rfc3339(951_782_400 + 86_399, 999).as_str(),
            "2000-02-29T23:59:59.999Z"
        );
        assert_eq!(
            serde_json::to_string(&rfc3339(0, 7)).unwrap(),
            "\"1970-01-01T00:00:00.007Z\""
        );
    }

    #[tokio::test]
    async fn writes_rotates_and_hmacs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::new(
            AuditConfig {
                file: Some(path.clone()),
                max_bytes: 300,
                keep: 2,
                ..Default::default()
            },
            [7; 32].into(),
        );
        let h = audit.hmac("token-123");
        assert_eq!(h.len(), 32);
        assert_ne!(
            h,
            Audit::new(AuditConfig::default(), [8; 32].into()).hmac("token-123")
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
                    token_hmac: Some(&h),
                    method: None,
                    path: None,
                    duration_ms: None,
                    event: None,
                    detail: None,
                })
                .await
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

    fn event(caller: &str) -> AuditEvent<'_> {
        AuditEvent {
            time: now_rfc3339(),
            caller: Some(caller),
            rpc: "GetAccessToken",
            system_id: Some("s"),
            outcome: "ok",
            code: "OK",
            token_hmac: None,
            method: None,
            path: None,
            duration_ms: None,
            event: None,
            detail: None,
        }
    }

    /// A trail whose last line a crash cut short: the next line starts on a line of its own.
    #[tokio::test]
    async fn a_line_cut_short_before_is_ended_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        std::fs::write(&path, "{\"whole\":1}\n{\"time\":\"2026-").unwrap();
        let audit = Audit::new(
            AuditConfig {
                file: Some(path.clone()),
                ..Default::default()
            },
            [5; 32].into(),
        );
        audit.record(&event("w")).await.unwrap();
        audit.record(&event("v")).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[1], "{\"time\":\"2026-");
        for l in [lines[0], lines[2], lines[3]] {
            assert!(serde_json::from_str::<serde_json::Value>(l).is_ok(), "{l}");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_events_share_writes_and_each_call_returns_after_its_line_landed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Arc::new(Audit::new(
            AuditConfig {
                file: Some(path.clone()),
                ..Default::default()
            },
            [3; 32].into(),
        ));
        let mut tasks = Vec::new();
        for i in 0..400 {
            let (audit, path) = (audit.clone(), path.clone());
            tasks.push(tokio::spawn(async move {
                let name = format!("caller-{i}");
                audit.record(&event(&name)).await.unwrap();
                // Answered only once the line is in the file.
                let text = std::fs::read_to_string(&path).unwrap();
                assert!(text.contains(&format!("\"{name}\"")), "{name} missing");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 400);
        assert!(text
            .lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
        let batches = audit.batches_written();
        assert!(
            batches < 400,
            "{batches} writes for 400 concurrent events: nothing was batched"
        );
    }

    async fn poll_once<F: std::future::Future>(
        mut f: std::pin::Pin<&mut F>,
    ) -> std::task::Poll<F::Output> {
        std::future::poll_fn(|cx| std::task::Poll::Ready(f.as_mut().poll(cx))).await
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_cancelled_leader_still_writes_its_batch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let audit = Audit::new(
            AuditConfig {
                file: Some(path.clone()),
                ..Default::default()
            },
            [4; 32].into(),
        );
        let leader_event = event("leader");
        // Boxed, so that dropping it really drops the future.
        let mut leader = Box::pin(audit.record(&leader_event));
        // Polled once: it leads the batch and yields; then its caller goes away.
        assert!(poll_once(leader.as_mut()).await.is_pending());
        let follower_event = event("follower");
        let follower = audit.record(&follower_event);
        tokio::pin!(follower);
        assert!(poll_once(follower.as_mut()).await.is_pending());
        drop(leader);
        tokio::time::timeout(std::time::Duration::from_secs(5), follower)
            .await
            .expect("the follower was stranded by its cancelled leader")
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"leader\"") && text.contains("\"follower\""));
        assert_eq!(audit.batches_written(), 1);
    }

    /// An audit trail whose file is `/dev/full` (opens, every write fails), in `dir`.
    fn on_dev_full(dir: &std::path::Path) -> (Audit, std::path::PathBuf) {
        let path = dir.join("audit.log");
        std::os::unix::fs::symlink("/dev/full", &path).unwrap();
        let config = AuditConfig {
            file: Some(path.clone()),
            ..Default::default()
        };
        (Audit::new(config, [1; 32].into()), path)
    }

    #[tokio::test]
    async fn unwritable_sink_is_reported_and_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, path) = on_dev_full(dir.path());
        let ev = AuditEvent::now("x", "ok", "OK");
        assert!(audit.record(&ev).await.is_err());
        assert!(!audit.is_healthy());
        std::fs::remove_file(&path).unwrap();
        assert!(audit.record(&ev).await.is_ok());
        assert!(audit.is_healthy());
    }

    /// A failing sink is tried again at once, then after a growing wait: a probe every second
    /// does not write a line a second (to stdout, say, while the file is what fails).
    #[tokio::test]
    async fn a_failing_sink_is_rechecked_at_a_growing_interval() {
        let dir = tempfile::tempdir().unwrap();
        let (audit, path) = on_dev_full(dir.path());
        audit.recheck().await;
        assert_eq!(audit.batches_written(), 0, "a healthy sink is left alone");
        audit.check_at_start();
        assert!(audit.is_healthy(), "/dev/full opens");
        assert!(audit.record(&event("x")).await.is_err());
        let failed = audit.batches_written();
        for _ in 0..5 {
            audit.recheck().await;
        }
        assert_eq!(audit.batches_written(), failed + 1);
        assert!(!audit.is_healthy());
        std::fs::remove_file(&path).unwrap();
        // The next try is a second away; back-dated here instead of waited for.
        if let Some((at, _)) = crate::util::sync::lock(&audit.rechecks).as_mut() {
            *at = std::time::Instant::now();
        }
        audit.recheck().await;
        assert!(audit.is_healthy());
        let written = std::fs::read_to_string(&path).unwrap();
        assert!(written.contains(r#""rpc":"AuditCheck""#), "{written}");
    }
}
